"""The API dialects the simulated clients speak.

A dialect is one small function: it reads one response message (an SSE event, an
NDJSON line, or a whole JSON body with its status) and says what it meant, as
signals: text, a finish, an error, the end-of-stream marker. The decorator gives
it the endpoint, the framing and the request body. Adding a dialect to the
simulator is writing one such function; `available()` offers the sweep every
dialect whose endpoint the app actually serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

Framing = Literal["sse", "ndjson", "json"]
MODEL = "sim"


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Finish:
    reason: str


@dataclass(frozen=True)
class Error:
    detail: str


@dataclass(frozen=True)
class Done:
    """The dialect's end-of-stream marker after the terminal event (`[DONE]`)."""


@dataclass(frozen=True)
class Bad:
    """A message the client could not make sense of."""

    detail: str


Signal = Text | Finish | Error | Done | Bad
# (SSE event name or None, parsed JSON payload or raw string, HTTP status)
Reader = Callable[[str | None, Any, int], Iterable[Signal]]
BodyFn = Callable[[str, int], dict[str, Any]]


@dataclass(frozen=True)
class Dialect:
    name: str
    path: str
    framing: Framing
    body: BodyFn
    read: Reader
    method: str = "POST"

    @property
    def streaming(self) -> bool:
        return self.framing != "json"


DIALECTS: dict[str, Dialect] = {}


def dialect(name: str, path: str, framing: Framing, body: BodyFn) -> Callable[[Reader], Reader]:
    def register(read: Reader) -> Reader:
        DIALECTS[name] = Dialect(name, path, framing, body, read)
        return read

    return register


def available(paths: Iterable[str]) -> list[Dialect]:
    """The dialects whose endpoint is among the app's routes, in a fixed order."""
    served = set(paths)
    return [d for _, d in sorted(DIALECTS.items()) if d.path in served]


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


# Requests with tools (issue 15): the fake runner answers them with one call
# (sim/fake_runner.py); the readers rebuild the call's text from what the dialect
# sends, so the ledger compares it with what the runner produced.
TOOLS = [
    {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {}}}},
    }
]


def call_text(name: str, arguments: Any) -> Text:
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return Text("<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>")


def _error_detail(payload: Any, status: int) -> str:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            return f"{status} {error.get('code') or error.get('type')}: {error.get('message')}"
        if error is not None:
            return f"{status} {error}"
    return f"{status} {payload!r}"[:200]


# ---- OpenAI chat completions ----


def _openai_sse_end(payload: Any, status: int) -> Signal | None:
    """What ends an OpenAI SSE stream's reading at this event, if anything: the
    [DONE] sentinel, a payload that is not JSON, or an error event."""
    if payload == "[DONE]":
        return Done()
    if not isinstance(payload, dict):
        return Bad(f"not JSON: {payload!r}")
    if "error" in payload:
        return Error(_error_detail(payload, status))
    return None


@dialect(
    "openai_chat_stream",
    "/v1/chat/completions",
    "sse",
    lambda prompt, n: {"model": MODEL, "messages": _user(prompt), "max_tokens": n, "stream": True},
)
def openai_chat_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    ended = _openai_sse_end(payload, status)
    if ended is not None:
        yield ended
        return
    choices = payload.get("choices")
    if not choices:
        return  # the usage chunk
    choice = choices[0]
    delta = choice.get("delta") or {}
    content = delta.get("content")
    if content:
        yield Text(content)
    for call in delta.get("tool_calls") or ():
        yield call_text(call["function"]["name"], call["function"]["arguments"])
    if choice.get("finish_reason") is not None:
        yield Finish(choice["finish_reason"])


@dialect(
    "openai_chat_tools_stream",
    "/v1/chat/completions",
    "sse",
    lambda prompt, n: {
        "model": MODEL,
        "messages": _user(prompt),
        "max_tokens": n,
        "stream": True,
        "tools": TOOLS,
        # A forced call is a grammar: the node compiles it, the runner gets it.
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "logprobs": True,
        "top_logprobs": 2,
    },
)
def openai_chat_tools_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    return openai_chat_stream(event, payload, status)


@dialect(
    "openai_chat",
    "/v1/chat/completions",
    "json",
    lambda prompt, n: {"model": MODEL, "messages": _user(prompt), "max_tokens": n},
)
def openai_chat(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    if status != 200 or not isinstance(payload, dict) or "choices" not in payload:
        yield Error(_error_detail(payload, status))
        return
    choice = payload["choices"][0]
    content = choice["message"].get("content")
    if content:
        yield Text(content)
    yield Finish(choice["finish_reason"])


@dialect(
    "bench_chat",
    "/bench/chat/completions",
    "json",
    lambda prompt, n: {"model": MODEL, "messages": _user(prompt), "max_tokens": n},
)
def bench_chat(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    yield from openai_chat(event, payload, status)
    if status == 200 and isinstance(payload, dict) and "generation_stats" not in payload:
        yield Bad("bench response without generation_stats")


# ---- OpenAI legacy completions ----


@dialect(
    "openai_completions_stream",
    "/v1/completions",
    "sse",
    lambda prompt, n: {"model": MODEL, "prompt": prompt, "max_tokens": n, "stream": True},
)
def openai_completions_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    ended = _openai_sse_end(payload, status)
    if ended is not None:
        yield ended
        return
    for choice in payload.get("choices") or ():
        if choice.get("text"):
            yield Text(choice["text"])
        if choice.get("finish_reason") is not None:
            yield Finish(choice["finish_reason"])


@dialect(
    "openai_completions",
    "/v1/completions",
    "json",
    lambda prompt, n: {"model": MODEL, "prompt": prompt, "max_tokens": n},
)
def openai_completions(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    if status != 200 or not isinstance(payload, dict) or "choices" not in payload:
        yield Error(_error_detail(payload, status))
        return
    choice = payload["choices"][0]
    if choice.get("text"):
        yield Text(choice["text"])
    yield Finish(choice["finish_reason"])


# ---- OpenAI responses ----

_RESPONSE_FINISH = {"completed": "stop", "incomplete": "length"}


@dialect(
    "openai_responses_stream",
    "/v1/responses",
    "sse",
    lambda prompt, n: {"model": MODEL, "input": prompt, "max_output_tokens": n, "stream": True},
)
def openai_responses_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    if not isinstance(payload, dict):
        yield Bad(f"not JSON: {payload!r}")
        return
    if status != 200 or ("error" in payload and event is None):
        yield Error(_error_detail(payload, status))
        return
    kind = payload.get("type")
    if kind != event:
        yield Bad(f"event {event!r} carries type {kind!r}")
    if kind == "response.output_text.delta":
        yield Text(payload["delta"])
    elif kind == "response.function_call_arguments.done":
        yield call_text(payload["name"], payload["arguments"])
    elif kind in ("response.completed", "response.incomplete"):
        yield Finish(_RESPONSE_FINISH[payload["response"]["status"]])
    elif kind == "response.failed":
        yield Error(f"response.failed: {payload['response'].get('error')}")
    elif kind == "error":
        yield Error(f"error event: {payload}")


@dialect(
    "openai_responses_tools_stream",
    "/v1/responses",
    "sse",
    lambda prompt, n: {
        "model": MODEL,
        "input": prompt,
        "max_output_tokens": n,
        "stream": True,
        "tools": [{"type": "function", **TOOLS[0]["function"]}],
        "tool_choice": {"type": "function", "name": "f"},
    },
)
def openai_responses_tools_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    return openai_responses_stream(event, payload, status)


@dialect(
    "openai_responses",
    "/v1/responses",
    "json",
    lambda prompt, n: {"model": MODEL, "input": prompt, "max_output_tokens": n},
)
def openai_responses(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    if status != 200 or not isinstance(payload, dict) or payload.get("object") != "response":
        yield Error(_error_detail(payload, status))
        return
    for item in payload.get("output") or ():
        for part in item.get("content") or ():
            if part.get("text"):
                yield Text(part["text"])
    if payload["status"] == "failed":
        yield Error(f"response failed: {payload.get('error')}")
    else:
        yield Finish(_RESPONSE_FINISH[payload["status"]])


# ---- Anthropic messages ----

_ANTHROPIC_FINISH = {"max_tokens": "length", "end_turn": "stop", "stop_sequence": "stop"}


def _anthropic_body(stream: bool) -> BodyFn:
    return lambda prompt, n: {
        "model": MODEL,
        "max_tokens": n,
        "messages": _user(prompt),
        "stream": stream,
    }


@dialect("anthropic_stream", "/v1/messages", "sse", _anthropic_body(True))
def anthropic_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    if not isinstance(payload, dict):
        yield Bad(f"not JSON: {payload!r}")
        return
    kind = payload.get("type")
    if status != 200 or kind == "error":
        yield Error(_error_detail(payload, status))
        return
    if kind != event:
        yield Bad(f"event {event!r} carries type {kind!r}")
    if kind == "content_block_delta":
        yield Text(payload["delta"]["text"])
    elif kind == "message_delta":
        yield Finish(_ANTHROPIC_FINISH[payload["delta"]["stop_reason"]])
    elif kind == "message_stop":
        yield Done()


@dialect("anthropic", "/v1/messages", "json", _anthropic_body(False))
def anthropic(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    if status != 200 or not isinstance(payload, dict) or payload.get("type") != "message":
        yield Error(_error_detail(payload, status))
        return
    for block in payload.get("content") or ():
        if block.get("text"):
            yield Text(block["text"])
    yield Finish(_ANTHROPIC_FINISH[payload["stop_reason"]])


# ---- Ollama chat and generate (NDJSON) ----


def _ollama_body(kind: str, stream: bool) -> BodyFn:
    def body(prompt: str, n: int) -> dict[str, Any]:
        text = {"messages": _user(prompt)} if kind == "chat" else {"prompt": prompt}
        return {"model": MODEL, **text, "stream": stream, "options": {"num_predict": n}}

    return body


def _ollama(payload: Any, status: int, key: str) -> Iterable[Signal]:
    if status != 200 or not isinstance(payload, dict) or "error" in payload:
        yield Error(_error_detail(payload, status))
        return
    piece = payload.get(key)
    text = piece.get("content") if isinstance(piece, dict) else piece
    if text:
        yield Text(text)
    if payload.get("done"):
        yield Finish(payload.get("done_reason") or "stop")


def _ollama_tools(payload: Any, status: int) -> Iterable[Signal]:
    yield from _ollama(payload, status, "message")
    message = payload.get("message") if isinstance(payload, dict) else None
    for call in (message or {}).get("tool_calls") or ():
        yield call_text(call["function"]["name"], call["function"]["arguments"])


@dialect(
    "ollama_chat_tools_stream",
    "/api/chat",
    "ndjson",
    lambda prompt, n: {
        **_ollama_body("chat", True)(prompt, n),
        "tools": TOOLS,
        "format": {"type": "object"},
    },
)
def ollama_chat_tools_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    return _ollama_tools(payload, status)


@dialect("ollama_chat_stream", "/api/chat", "ndjson", _ollama_body("chat", True))
def ollama_chat_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    return _ollama(payload, status, "message")


@dialect("ollama_chat", "/api/chat", "json", _ollama_body("chat", False))
def ollama_chat(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    return _ollama(payload, status, "message")


@dialect("ollama_generate_stream", "/ollama/api/generate", "ndjson", _ollama_body("generate", True))
def ollama_generate_stream(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    return _ollama(payload, status, "response")


@dialect("ollama_generate", "/api/generate", "json", _ollama_body("generate", False))
def ollama_generate(event: str | None, payload: Any, status: int) -> Iterable[Signal]:
    return _ollama(payload, status, "response")
