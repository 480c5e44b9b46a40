"""The property every API response must have, checked strictly.

Any request gives either a well-formed 4xx in the envelope of the dialect its
path belongs to, or a valid response: a JSON document of the right shape, or a
complete SSE / NDJSON stream that ends with its dialect's success terminal. Never
a 5xx, never a truncated body, never an error terminal (the fuzz node's runner is
healthy, so any failure is the node's own), and the generated text is exactly what
the fake runner produced for the request id in X-Request-Id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from fuzz.http1 import RawResponse
from fuzz.inproc import expected_text


class PropertyViolation(AssertionError):
    """A response broke the API property. The message says how."""


def fail(message: str) -> None:
    raise PropertyViolation(message)


def normalized_path(target: str) -> str:
    """The path the app routes on: percent-decoded, without the query, and with
    runs of slashes merged, as werkzeug's router does ("//v1//models" is
    "/v1/models")."""
    return re.sub("/+", "/", "/" + unquote(target.split("?", 1)[0]))


def dialect_of(path: str) -> str:
    """Which error envelope a path must get (an independent statement of the rule
    in docs/api.md, not the code under test)."""
    path = normalized_path(path)
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith(("/api/", "/ollama/")):
        return "ollama"
    return "openai"


def load_json(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise PropertyViolation(f"{what} is not JSON ({exc}): {data[:300]!r}") from None


def check_error_envelope(response: RawResponse, path: str) -> None:
    if response.content_type != "application/json":
        fail(f"{response.status} with content-type {response.content_type!r}")
    body = load_json(response.body, f"{response.status} body")
    dialect = dialect_of(path)
    if dialect == "openai":
        error = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(error, dict) and isinstance(error.get("message"), str)):
            fail(f"not an OpenAI error envelope: {body!r:.300}")
        if not isinstance(error.get("type"), str) or "param" not in error or "code" not in error:
            fail(f"OpenAI error envelope misses fields: {body!r:.300}")
    elif dialect == "anthropic":
        error = body.get("error") if isinstance(body, dict) else None
        if body.get("type") != "error" or not isinstance(error, dict):
            fail(f"not an Anthropic error envelope: {body!r:.300}")
        if not isinstance(error.get("type"), str) or not isinstance(error.get("message"), str):
            fail(f"Anthropic error envelope misses fields: {body!r:.300}")
    elif not (isinstance(body, dict) and isinstance(body.get("error"), str)):
        fail(f"not an Ollama error envelope: {body!r:.300}")


@dataclass
class Sse:
    event: str | None
    data: str


def parse_sse(body: bytes) -> list[Sse]:
    """Strict SSE: events end with a blank line; lines are `event:`, `data:` or a
    `:` comment. Comment-only blocks (keep-alives) are dropped."""
    text = body.decode("utf-8")
    if text and not text.endswith("\n\n"):
        fail(f"SSE body does not end with a blank line: {text[-80:]!r}")
    events = []
    for block in text.split("\n\n")[:-1]:
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(": ")
            if not sep or field not in ("event", "data"):
                fail(f"bad SSE line {line!r}")
            if field == "event":
                name = value
            else:
                data.append(value)
        if data:
            events.append(Sse(name, "\n".join(data)))
        elif name is not None:
            fail(f"SSE event {name!r} without data")
    return events


def parse_ndjson(body: bytes) -> list[Any]:
    text = body.decode("utf-8")
    if text and not text.endswith("\n"):
        fail("NDJSON body does not end with a newline")
    return [load_json(line, "NDJSON line") for line in text.split("\n")[:-1]]


def check_text(text: str, request_id: str, chunks: int | None, prefix: str = "") -> None:
    """The generated text is exactly the fake runner's tokens for this request
    (after `prefix`: a legacy completion's echoed prompt)."""
    if not text.startswith(prefix):
        fail(f"text {text[:120]!r} does not start with the echoed prompt {prefix[:60]!r}")
    text = text[len(prefix) :]
    if chunks is not None:
        want = expected_text(request_id, chunks)
        if text != want:
            fail(f"text {text[:120]!r} is not the runner's {chunks} tokens {want[:120]!r}")
        return
    n = 0
    while len(expected_text(request_id, n)) < len(text):
        n += 1
    if text != expected_text(request_id, n):
        fail(f"text {text[:120]!r} is not a prefix-exact token stream of {request_id}")


def check_generation(response: RawResponse, route: str, echo: str = "") -> None:
    """A 2xx from a generation route: a valid body in the route's dialect. `echo`
    is the prompt a legacy completion with echo puts before its text."""
    rid = response.headers.get("x-request-id")
    if not rid:
        fail("generation response without X-Request-Id")
    ctype = response.content_type
    if ctype == "text/event-stream":
        check_sse_stream(parse_sse(response.body), route, rid, echo)
    elif ctype == "application/x-ndjson":
        check_ndjson_stream(parse_ndjson(response.body), rid)
    elif ctype == "application/json":
        check_json_generation(load_json(response.body, "200 body"), route, rid, echo)
    else:
        fail(f"generation response with content-type {ctype!r}")


def check_sse_stream(events: list[Sse], route: str, rid: str, echo: str = "") -> None:
    if not events:
        fail("empty SSE stream")
    if route in ("/v1/chat/completions", "/v1/completions"):
        if events[-1].data != "[DONE]":
            fail(f"OpenAI stream ends with {events[-1].data[:200]!r}, not [DONE]")
        text, usage, finishes = [], None, 0
        key = "delta" if route == "/v1/chat/completions" else "text"
        for event in events[:-1]:
            chunk = load_json(event.data, "SSE data")
            if "error" in chunk:
                fail(f"error event in a healthy stream: {chunk!r:.300}")
            if chunk.get("id") != rid:
                fail(f"chunk id {chunk.get('id')!r} != X-Request-Id {rid!r}")
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") if key == "delta" else choice["text"]
                text.append(piece or "")
                finishes += choice.get("finish_reason") is not None
        if finishes != 1:
            fail(f"{finishes} finish reasons in one stream")
        check_text("".join(text), rid, usage, echo)
    elif route == "/v1/messages":
        kinds = [e.event for e in events]
        if kinds[0] != "message_start" or kinds[-1] != "message_stop":
            fail(f"Anthropic stream shape {kinds[:3]}...{kinds[-3:]}")
        if "error" in kinds:
            fail("error event in a healthy Anthropic stream")
        text = []
        usage = None
        for event in events:
            payload = load_json(event.data, "SSE data")
            if payload.get("type") != event.event:
                fail(f"event {event.event!r} carries type {payload.get('type')!r}")
            if event.event == "content_block_delta":
                text.append(payload["delta"]["text"])
            elif event.event == "message_delta":
                usage = payload["usage"]["output_tokens"]
        check_text("".join(text), rid, usage)
    elif route == "/v1/responses":
        text, done_text, usage = [], None, None
        for seq, event in enumerate(events):
            payload = load_json(event.data, "SSE data")
            if payload.get("type") != event.event or payload.get("sequence_number") != seq:
                fail(f"Responses event {seq} is {event.event!r}/{payload.get('sequence_number')}")
            if event.event == "response.output_text.delta":
                text.append(payload["delta"])
            elif event.event == "response.output_text.done":
                done_text = payload["text"]
            elif event.event in ("response.completed", "response.incomplete"):
                usage = payload["response"]["usage"]["output_tokens"]
        if events[-1].event not in ("response.completed", "response.incomplete"):
            fail(f"Responses stream ends with {events[-1].event!r}")
        if done_text != "".join(text):
            fail("response.output_text.done differs from the deltas")
        check_text("".join(text), rid, usage)
    else:
        fail(f"SSE from unexpected route {route}")


def check_ndjson_stream(lines: list[Any], rid: str) -> None:
    if not lines:
        fail("empty NDJSON stream")
    if any("error" in line for line in lines):
        fail(f"error line in a healthy NDJSON stream: {lines[-1]!r:.300}")
    if [line.get("done") for line in lines] != [False] * (len(lines) - 1) + [True]:
        fail("NDJSON stream: `done` must be true on the last line only")
    pieces = [
        line["message"]["content"] if "message" in line else line["response"] for line in lines
    ]
    check_text("".join(pieces), rid, lines[-1].get("eval_count"))


def check_json_generation(body: Any, route: str, rid: str, echo: str = "") -> None:
    if not isinstance(body, dict):
        fail(f"200 body is not an object: {body!r:.200}")
    if route in ("/v1/chat/completions", "/bench/chat/completions"):
        if body.get("object") != "chat.completion" or body.get("id") != rid:
            fail(f"bad chat.completion: {body!r:.300}")
        text = body["choices"][0]["message"]["content"]
        check_text(text, rid, body["usage"]["completion_tokens"])
        if route.startswith("/bench") and "generation_stats" not in body:
            fail("bench response without generation_stats")
    elif route == "/v1/completions":
        if body.get("object") != "text_completion" or body.get("id") != rid:
            fail(f"bad text_completion: {body!r:.300}")
        text = body["choices"][0]["text"]
        check_text(text, rid, body["usage"]["completion_tokens"], echo)
    elif route == "/v1/responses":
        if body.get("object") != "response" or body.get("status") not in (
            "completed",
            "incomplete",
        ):
            fail(f"bad response object: {body!r:.300}")
        text = body["output"][0]["content"][0]["text"]
        check_text(text, rid, body["usage"]["output_tokens"])
    elif route == "/v1/messages":
        if body.get("type") != "message" or body.get("id") != rid:
            fail(f"bad Anthropic message: {body!r:.300}")
        check_text(body["content"][0]["text"], rid, body["usage"]["output_tokens"])
    elif route.endswith(("/api/chat", "/api/generate")):
        if body.get("done") is not True:
            fail(f"Ollama body not done: {body!r:.300}")
        text = body["message"]["content"] if "message" in body else body["response"]
        check_text(text, rid, body.get("eval_count"))
    else:
        fail(f"JSON generation from unexpected route {route}")


def check_ollama_load(body: Any) -> None:
    loaded = isinstance(body, dict) and body.get("done") is True
    if not (loaded and body.get("done_reason") == "load"):
        fail(f"Ollama load answer malformed: {body!r:.300}")
