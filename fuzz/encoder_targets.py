"""Fuzz target for the stream encoders: every dialect's SSE or NDJSON, parsed back.

An input is a dialect byte, a flags byte and text. The text, split at NUL bytes,
is a sequence of generated pieces (any Unicode: newlines, `data:` lookalikes,
U+2028, emoji); the flags choose keep-alives between pieces, usage reporting and
whether the stream ends in a finish or a failure. The pieces go through the
dialect's real StreamEncoder; a strict SSE / NDJSON parser reads the bytes back.
The property: the framing is intact (every event parses, nothing leaks out of a
JSON string into the framing), the text read back is exactly the text put in, in
order, and the stream ends with the terminal its ending asks for.
"""

from __future__ import annotations

from typing import Any

from exo_trio.api.anthropic import AnthropicEvents
from exo_trio.api.chat_plan import ChatSetup
from exo_trio.api.completions import CompletionChunks
from exo_trio.api.generation import Timing
from exo_trio.api.ollama import OllamaLines
from exo_trio.api.openai_chat import ChatChunks
from exo_trio.api.responses import ResponseEvents, ResponseShape, ResponsesRequest
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.chat_output import ChatFormat
from exo_trio.seams import Seams
from exo_trio.types import GenerationFailed, GenerationFinished, SamplingParams, TextGeneration
from fuzz.checks import PropertyViolation, load_json, parse_ndjson, parse_sse

DIALECTS = ("chat", "completions", "responses", "anthropic", "ollama_chat", "ollama_generate")


class StubNode:
    """What the encoders read from a node: its seams."""

    seams = Seams(wall_clock=lambda: 1_700_000_000.0, new_id=lambda prefix: f"{prefix}-1")


def encoder_for(dialect: str, command: TextGeneration, usage: bool) -> StreamEncoder:
    node: Any = StubNode()
    # A model without markers: every piece is answer text (chat_output.py's
    # splitting of thinking and calls has its own property test).
    setup = ChatSetup(ChatFormat(), None, False, lambda: "call-1")
    if dialect == "chat":
        return ChatChunks(command, 0, usage, setup)
    if dialect == "completions":
        return CompletionChunks(command, 0, usage, "")
    if dialect == "responses":
        body = ResponsesRequest(model="demo", input="x")
        return ResponseEvents(ResponseShape(node, command, body, setup))
    if dialect == "anthropic":
        return AnthropicEvents(command, setup)
    kind = "chat" if dialect == "ollama_chat" else "generate"
    return OllamaLines(node, "demo", kind, setup)


def read_back(dialect: str, body: bytes) -> tuple[str, str]:
    """(text, ending) from the bytes; ending is "finish" or "fail"."""
    if dialect.startswith("ollama"):
        lines = parse_ndjson(body)
        if "error" in lines[-1]:
            pieces = lines[:-1]
            ending = "fail"
        else:
            pieces, ending = lines, "finish"
        key = "message" if dialect == "ollama_chat" else "response"
        text = "".join(p[key]["content"] if key == "message" else p[key] for p in pieces)
        return text, ending
    events = parse_sse(body)
    text: list[str] = []
    ending = "open"
    for event in events:
        if event.data == "[DONE]":
            ending = "finish"
            continue
        payload = load_json(event.data, "SSE data")
        if dialect in ("chat", "completions"):
            if "error" in payload:
                ending = "fail"
                continue
            for choice in payload["choices"]:
                piece = choice["delta"].get("content") if dialect == "chat" else choice["text"]
                text.append(piece or "")
        elif dialect == "responses":
            if event.event == "response.output_text.delta":
                text.append(payload["delta"])
            elif event.event == "response.completed" or event.event == "response.incomplete":
                ending = "finish"
            elif event.event == "response.failed":
                ending = "fail"
        else:
            if event.event == "content_block_delta":
                text.append(payload["delta"]["text"])
            elif event.event == "message_stop":
                ending = "finish"
            elif event.event == "error":
                ending = "fail"
    return "".join(text), ending


class EncoderHarness:
    def one(self, data: bytes) -> None:
        if len(data) < 2:
            return
        dialect = DIALECTS[data[0] % len(DIALECTS)]
        flags = data[1]
        pieces = data[2:].decode("utf-8", "replace").split("\x00")
        command = TextGeneration(
            request_id="chatcmpl-1",
            model="demo",
            prompt_tokens=[1],
            params=SamplingParams(max_tokens=9),
        )
        encoder = encoder_for(dialect, command, usage=bool(flags & 1))
        timing = Timing(started=0.0, first_token=0.5, last_token=0.9, ended=1.0)
        out = list(encoder.start())
        for i, piece in enumerate(pieces):
            if flags & 2 and i % 2:
                out += encoder.keepalive()
            if piece:  # the relay never encodes empty text
                out += encoder.text(piece)
        fails = bool(flags & 4)
        if fails:
            out += encoder.fail(
                GenerationFailed(request_id="chatcmpl-1", kind="runner_died", message="x\ny"),
                timing,
            )
        else:
            out += encoder.finish(
                GenerationFinished(
                    request_id="chatcmpl-1",
                    chunks=len(pieces),
                    finish_reason="length",
                    prompt_tokens=1,
                    completion_tokens=len(pieces),
                ),
                timing,
            )
        try:
            text, ending = read_back(dialect, b"".join(out))
        except PropertyViolation:
            raise
        except (KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
            raise PropertyViolation(f"{dialect}: stream not readable back: {exc!r}") from exc
        if text != "".join(pieces):
            raise PropertyViolation(f"{dialect}: read back {text[:80]!r}, sent {pieces[:4]!r}")
        if ending != ("fail" if fails else "finish"):
            raise PropertyViolation(f"{dialect}: stream ended {ending!r}")

    def close(self) -> None:
        return None


def make(name: str) -> EncoderHarness:
    return EncoderHarness()
