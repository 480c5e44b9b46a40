"""One HTTP client of the load harness: a request in any dialect, read incrementally,
that may vanish at a chosen point.

Raw sockets (trio) rather than a client library, so a client can disappear exactly
where the harness wants: with half its request head sent, with its request sent but
no response head read, with half its body sent, or after k streamed chunks, with a
FIN or a RST. The response is parsed as it arrives (chunked transfer, then SSE
events or NDJSON lines) into text pieces and one terminal: done, or an error kind.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from fuzz.http1 import build_request

DIALECTS = ("chat", "completions", "responses", "messages", "ollama_chat", "ollama_generate")
PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
    "ollama_chat": "/api/chat",
    "ollama_generate": "/api/generate",
}
# Where a vanishing client goes away.
VANISH = ("head_partial", "before_headers", "mid_body", "mid_stream")


@dataclass
class Plan:
    index: int
    dialect: str
    stream: bool
    prompt: str
    max_tokens: int
    vanish: str | None = None
    vanish_after: int = 0  # chunks read before vanishing mid-stream
    rst: bool = False  # vanish with a RST rather than a FIN
    raw: bytes | None = None  # a malformed request, sent as is
    recv_buffer: int | None = None  # SO_RCVBUF, for slow readers
    stall_after: int | None = None  # stop reading (without closing) after k chunks
    vanish_delay: float = 0.0  # "waiting": close this long after sending, unanswered

    @property
    def chat_like(self) -> bool:
        return self.dialect not in ("completions",)


@dataclass
class Outcome:
    plan: Plan
    status: int | None = None
    kind: str = "pending"  # done, vanished, error:<what>, http_<status>, protocol, cut
    pieces: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    detail: str = ""
    started: float = 0.0
    first_piece: float | None = None
    ended: float | None = None
    held: trio.SocketStream | None = None  # a stalled reader's socket, left open

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def request_body(plan: Plan, eos: list[int]) -> dict[str, Any]:
    ban = {str(t): -100 for t in eos}
    messages = [{"role": "user", "content": plan.prompt}]
    n = plan.max_tokens
    d = plan.dialect
    if d == "chat":
        body: dict[str, Any] = {"model": "demo", "messages": messages, "max_tokens": n}
        if plan.stream:
            body["stream_options"] = {"include_usage": True}
    elif d == "completions":
        body = {"model": "demo", "prompt": plan.prompt, "max_tokens": n}
        if plan.stream:
            body["stream_options"] = {"include_usage": True}
    elif d == "responses":
        body = {"model": "demo", "input": plan.prompt, "max_output_tokens": n}
    elif d == "messages":
        body = {"model": "demo", "messages": messages, "max_tokens": n}
    else:
        options = {"num_predict": n, "temperature": 0, "logit_bias": ban}
        body = {"model": "demo", "options": options, "stream": plan.stream}
        if d == "ollama_chat":
            body["messages"] = messages
        else:
            body["prompt"] = plan.prompt
        return body
    body.update(temperature=0, logit_bias=ban, stream=plan.stream)
    return body


def encode_request(plan: Plan, eos: list[int]) -> bytes:
    if plan.raw is not None:
        return plan.raw
    payload = json.dumps(request_body(plan, eos)).encode()
    headers = [("Content-Type", "application/json")]
    return build_request("POST", PATHS[plan.dialect], headers, payload)


class Stream:
    """Incremental HTTP/1.1 response reader over one socket stream."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    async def fill(self) -> bool:
        if self.eof:
            return False
        data = await self.sock.receive_some(65536)
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def head(self) -> tuple[int, dict[str, str]]:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end]).decode("latin-1")
                del self.buffer[: end + 4]
                if head.startswith("HTTP/1.1 1"):
                    continue  # 100 Continue
                lines = head.split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                return int(lines[0].split(" ")[1]), headers
            if not await self.fill():
                raise EOFError("connection closed before the response head")

    async def chunks(self, headers: dict[str, str]) -> Any:
        """Body bytes as they arrive; raises EOFError if the body is cut short."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while b"\r\n" not in self.buffer:
                    if not await self.fill():
                        raise EOFError("chunked body cut short")
                line_end = self.buffer.find(b"\r\n")
                size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
                while len(self.buffer) < line_end + 2 + size + 2:
                    if not await self.fill():
                        raise EOFError("chunked body cut short")
                data = bytes(self.buffer[line_end + 2 : line_end + 2 + size])
                del self.buffer[: line_end + 2 + size + 2]
                if size == 0:
                    return
                yield data
        length = int(headers.get("content-length", "-1"))
        got = 0
        while length < 0 or got < length:
            if self.buffer:
                data = bytes(self.buffer)
                self.buffer.clear()
                got += len(data)
                yield data
            elif not await self.fill():
                if length < 0:
                    return
                raise EOFError("body cut short")


def set_linger_rst(sock: trio.SocketStream) -> None:
    """Make close() send a RST (an abrupt vanish) instead of a FIN."""
    sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def connect(port: int, recv_buffer: int | None) -> trio.SocketStream:
    if recv_buffer is None:
        return await trio.open_tcp_stream("127.0.0.1", port)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def run_client(port: int, plan: Plan, eos: list[int], outcome: Outcome) -> None:
    """Run one client to its end; everything it saw goes into `outcome`."""
    outcome.started = time.monotonic()
    request = encode_request(plan, eos)
    sock = await connect(port, plan.recv_buffer)
    try:
        if plan.rst:
            set_linger_rst(sock)
        if plan.vanish == "head_partial":
            await sock.send_all(request[: max(1, request.find(b"\r\n\r\n") // 2)])
            outcome.kind = "vanished"
            return
        if plan.vanish == "mid_body":
            head_end = request.find(b"\r\n\r\n") + 4
            body_len = len(request) - head_end
            await sock.send_all(request[: head_end + body_len // 2])
            outcome.kind = "vanished"
            return
        await sock.send_all(request)
        if plan.vanish == "before_headers":
            outcome.kind = "vanished"
            return
        if plan.vanish == "waiting":
            # Close unanswered (or, if the answer came first, without reading it).
            with trio.move_on_after(plan.vanish_delay):
                await Stream(sock).head()
            outcome.kind = "vanished"
            return
        stream = Stream(sock)
        outcome.status, headers = await stream.head()
        ctype = headers.get("content-type", "").split(";")[0]
        parser = Parser(plan, outcome, ctype)
        async for data in stream.chunks(headers):
            parser.feed(data)
            if plan.vanish == "mid_stream" and len(outcome.pieces) >= plan.vanish_after:
                outcome.kind = "vanished"
                return
            if plan.stall_after is not None and len(outcome.pieces) >= plan.stall_after:
                outcome.kind = "stalled"
                return
        parser.end()
    except (EOFError, trio.BrokenResourceError, OSError) as exc:
        if outcome.kind == "pending":
            outcome.kind = "cut"
            outcome.detail = repr(exc)
    finally:
        outcome.ended = outcome.ended or time.monotonic()
        if outcome.kind == "stalled":
            outcome.held = sock  # open and unread until the harness lets it go
        else:
            await trio.aclose_forcefully(sock)


class Parser:
    """Turns body bytes into text pieces and a terminal, per dialect."""

    def __init__(self, plan: Plan, outcome: Outcome, ctype: str) -> None:
        self.plan = plan
        self.outcome = outcome
        self.ctype = ctype
        self.pending = b""

    def piece(self, text: str | None) -> None:
        if text:
            if self.outcome.first_piece is None:
                self.outcome.first_piece = time.monotonic()
            self.outcome.pieces.append(text)

    def terminal(self, kind: str, detail: str = "") -> None:
        if self.outcome.kind == "pending":
            self.outcome.kind = normalized(kind, detail)
            self.outcome.detail = detail
            self.outcome.ended = time.monotonic()

    def feed(self, data: bytes) -> None:
        if self.ctype == "text/event-stream":
            self.pending += data
            while b"\n\n" in self.pending:
                block, self.pending = self.pending.split(b"\n\n", 1)
                self.sse(block.decode())
        elif self.ctype == "application/x-ndjson":
            self.pending += data
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                self.ndjson(json.loads(line))
        else:
            self.pending += data

    def end(self) -> None:
        status = self.outcome.status or 0
        if self.ctype == "application/json" and self.pending:
            body = json.loads(self.pending)
            if status >= 400:
                self.terminal(f"http_{status}", json.dumps(body)[:200])
            else:
                self.whole(body)
        elif status >= 400:
            self.terminal(f"http_{status}")
        self.terminal("protocol", "the response ended without a terminal")

    def sse(self, block: str) -> None:
        event, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        if not data:
            return  # a keep-alive comment
        if data == "[DONE]":
            self.terminal("done")
            return
        payload = json.loads(data)
        d = self.plan.dialect
        if d in ("chat", "completions"):
            if "error" in payload:
                self.terminal(f"error:{payload['error'].get('code')}", payload["error"]["message"])
                return
            if payload.get("usage"):
                self.outcome.completion_tokens = payload["usage"]["completion_tokens"]
            for choice in payload["choices"]:
                self.piece(choice["delta"].get("content") if d == "chat" else choice["text"])
        elif d == "responses":
            if event == "response.output_text.delta":
                self.piece(payload["delta"])
            elif event in ("response.completed", "response.incomplete"):
                self.outcome.completion_tokens = payload["response"]["usage"]["output_tokens"]
                self.terminal("done")
            elif event == "response.failed":
                error = payload["response"]["error"]
                self.terminal(f"error:{error['code']}", error["message"])
        else:
            if event == "content_block_delta":
                self.piece(payload["delta"]["text"])
            elif event == "message_delta":
                self.outcome.completion_tokens = payload["usage"]["output_tokens"]
            elif event == "message_stop":
                self.terminal("done")
            elif event == "error":
                self.terminal(f"error:{payload['error']['type']}", payload["error"]["message"])

    def ndjson(self, line: dict[str, Any]) -> None:
        if "error" in line:
            self.terminal(f"error:{ollama_kind(line['error'])}", line["error"])
            return
        self.piece(line["message"]["content"] if "message" in line else line.get("response"))
        if line.get("done"):
            self.outcome.completion_tokens = line.get("eval_count")
            self.terminal("done")

    def whole(self, body: dict[str, Any]) -> None:
        d = self.plan.dialect
        if d == "chat":
            self.piece(body["choices"][0]["message"]["content"])
            self.outcome.completion_tokens = body["usage"]["completion_tokens"]
        elif d == "completions":
            self.piece(body["choices"][0]["text"])
            self.outcome.completion_tokens = body["usage"]["completion_tokens"]
        elif d == "responses":
            self.piece(body["output"][0]["content"][0]["text"])
            self.outcome.completion_tokens = body["usage"]["output_tokens"]
        elif d == "messages":
            self.piece(body["content"][0]["text"])
            self.outcome.completion_tokens = body["usage"]["output_tokens"]
        else:
            self.piece(body["message"]["content"] if "message" in body else body["response"])
            self.outcome.completion_tokens = body.get("eval_count")
        self.terminal("done")


def normalized(kind: str, detail: str) -> str:
    """One name per failure, whatever the dialect calls it (Anthropic's api_error,
    an Ollama error line): the node's own failure kind where the text shows it."""
    if not kind.startswith("error:"):
        return kind
    for marker, name in (
        ("runner stopped", "runner_died"),
        ("timed out", "timeout"),
        ("lost", "peer_lost"),
        ("acknowledging", "peer_lost"),
        ("cancelled", "cancelled"),
    ):
        if marker in detail:
            return f"error:{name}"
    return kind


def ollama_kind(message: str) -> str:
    for word in ("runner", "timed out", "cancelled"):
        if word in message:
            return word.replace(" ", "_")
    return "other"


def random_plan(
    index: int, rng: random.Random, prompts: list[tuple[str, int]], vanish_p: float
) -> Plan:
    prompt, max_tokens = rng.choice(prompts)
    plan = Plan(index, rng.choice(DIALECTS), rng.random() < 0.75, prompt, max_tokens)
    if rng.random() < vanish_p:
        plan.vanish = rng.choice(VANISH)
        if plan.vanish == "mid_stream":
            plan.vanish_after = rng.randrange(0, max_tokens)
            if not plan.stream:
                # Nothing to read mid-way: vanish while the answer is being made.
                plan.vanish, plan.vanish_delay = "waiting", rng.uniform(0.0, 0.5)
        plan.rst = rng.random() < 0.5
    return plan
