"""Simulated HTTP clients: one generation request each, over simulated connections.

A client sends its dialect's request, decodes the response as it arrives and
records what it saw (text pieces, terminal events, the end-of-stream marker, the
ids it was told) in a ClientResult, which the invariants compare against the
fake runner's ledger. Its plan says how it behaves: read at once, read slowly,
disconnect before the first chunk, mid-stream or right after the terminal event,
stop reading without closing (a stalled reader), or ask for its request to be
cancelled.

A keep-alive client keeps its connection for several requests: first the early
ones of its plan (an unknown route, a wrong method, a body over the limit, no API
key: each answered before the app reads the body), sometimes with the body sent
only after the answer began, sometimes with the next request pipelined behind;
then its generation request; then, perhaps, it leaves the connection open and
idle and waits for the node to close it. Told `connection: close` (or closed on),
it opens a new connection for its next request, as HTTP/1.1 clients do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio

from sim.dialects import DIALECTS, MODEL, Bad, Dialect, Done, Error, Finish, Signal, Text
from sim.encoder import tag_text
from sim.http import (
    Body,
    Closed,
    End,
    Event,
    HttpClient,
    NDJSONDecoder,
    ResponseHead,
    SSEDecoder,
    WholeBodyDecoder,
    loads,
    request_bytes,
)
from sim.scenario import ClientPlan, EarlyRequest

if TYPE_CHECKING:
    from sim.world import SimNode, World

REQUEST_ID_HEADER = "x-request-id"
CANCEL_PATH = "/v1/cancel/{id}"
# How long after its last response an idle keep-alive client waits for the node to
# close the connection, beyond the node's keep-alive timeout.
IDLE_SLACK = 0.5
# How long a stalled reader stays stalled, in send timeouts (then it reads on).
STALL_FOR = 4

Ending = Literal["complete", "server_closed", "left", "refused"]


@dataclass
class EarlyResult:
    """What one early request got."""

    kind: str
    late_body: bool = False
    pipelined: bool = False
    status: int | None = None  # None: no answer
    told_close: bool = False  # the answer said `connection: close`
    closed: bool = False  # the node closed the connection after it
    reused: bool = False  # the next request went out on this same connection


@dataclass
class ClientResult:
    plan: ClientPlan
    sent_at: float | None = None
    status: int | None = None
    request_id: str | None = None
    pieces: list[str] = field(default_factory=list)
    terminals: list[Finish | Error] = field(default_factory=list)
    after_terminal: list[Signal] = field(default_factory=list)
    done_marker: bool = False
    bad: list[str] = field(default_factory=list)
    ending: Ending | None = None  # None: still running at the horizon
    ended_at: float | None = None
    left_at: float | None = None
    first_byte_tick: int | None = None
    keepalives: int = 0
    cancel_status: int | None = None
    cancel_sent_at: float | None = None
    cancel_node: int | None = None  # the node the cancel went to
    server: Any = None  # the SimNode (incarnation) that served it
    # Keep-alive: the early requests; the generation request resent on a new
    # connection (its first copy was pipelined on one the node closed); the idle
    # wait after the last response (when it began, when the node closed it).
    early: list[EarlyResult] = field(default_factory=list)
    resent: bool = False
    idle_from: float | None = None
    idle_closed_at: float | None = None
    stalled_at: float | None = None  # a stalled reader stopped reading then

    @property
    def server_died(self) -> bool:
        """The node serving this client crashed before the exchange ended."""
        crashed_at = getattr(self.server, "crashed_at", None)
        return crashed_at is not None and (self.ended_at is None or crashed_at <= self.ended_at)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def prompt_for(plan: ClientPlan) -> str:
    return f"Count for me, please. {tag_text(plan.index)}"


class Client:
    def __init__(self, world: World, plan: ClientPlan, result: ClientResult) -> None:
        self.world = world
        self.plan = plan
        self.result = result
        self.dialect: Dialect = DIALECTS[plan.dialect]
        # Clients 1 and 2 of every four name their request (X-Request-Id) and
        # cancel it by that name; the others by the id the response gave them.
        # (Cancels of odd clients go to another node: all four pairs happen.)
        self.client_id = f"sim-c{plan.index}" if plan.index % 4 in (1, 2) else None

    def _connect(self, node: SimNode) -> HttpClient:
        stream = node.connect(self.plan)
        self._streams.append(stream)
        self._reused = False  # a new connection: nothing answered on it yet
        return HttpClient(stream, pause=self._pause if self.plan.read_pause_max else None)

    async def _pause(self) -> None:
        """A slow reader's pause before each read from its socket."""
        await trio.sleep(self.world.choices.between(0.0, self.plan.read_pause_max))

    async def _send(self, node: SimNode, http: HttpClient, data: bytes) -> HttpClient:
        """Send on `http`, or, if a reused connection turns out closed, on a new one
        (as HTTP clients do: the node closed it while it was idle)."""
        try:
            await http.stream.send_all(data)
            return http
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not self._reused:
                raise
        self._reconnected()
        http = self._connect(node)
        await http.stream.send_all(data)
        return http

    def _reconnected(self) -> None:
        """The connection kept after the last answer was closed by the node before
        the next request got an answer: record that it was not reused after all."""
        self.world.trace.add("client", self.plan.index, "reconnect")
        if self.result.early:
            self.result.early[-1].reused = False
            self.result.early[-1].closed = True

    def _headers(self, key: bool = True) -> dict[str, str]:
        api_key = self.world.plan.settings.api_key
        if key and api_key is not None:
            return {"authorization": f"Bearer {api_key}"}
        return {}

    async def run(self) -> None:
        plan, result, world = self.plan, self.result, self.world
        assert world.t0 is not None
        await trio.sleep_until(world.t0 + plan.start)
        node = world.nodes[plan.node]
        result.server = node
        self._streams: list[trio.abc.Stream] = []
        http = self._connect(node)
        body = json.dumps(self.dialect.body(prompt_for(plan), plan.max_tokens)).encode()
        headers = self._headers()
        if self.client_id:
            headers["X-Request-Id"] = self.client_id
        head, body = request_bytes(
            self.dialect.method, self.dialect.path, body, headers, close=not plan.keepalive
        )
        try:
            try:
                sent = False
                for i, early in enumerate(plan.early):
                    behind = head + body if i == len(plan.early) - 1 else None
                    http, sent = await self._early(node, http, early, behind)
                if not sent:
                    http = await self._send(node, http, head + body)
                    result.sent_at = trio.current_time()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._end("refused")
                return
            world.trace.add("client", plan.index, "sent", self.dialect.name)
            if plan.behavior == "leave_before_first":
                await trio.sleep(plan.leave_after_time / 10)
                self._leave()
                return
            deadline = math.inf
            if plan.behavior == "leave_mid" and not self.dialect.streaming:
                deadline = trio.current_time() + plan.leave_after_time
            told_close = True
            with trio.move_on_at(deadline):
                if self._reused:
                    # Closed by the node before it answered (it had closed the idle
                    # connection): the request goes again on a new connection.
                    event = await http.next_event()
                    if isinstance(event, Closed):
                        self._reconnected()
                        result.resent = True
                        http = self._connect(node)
                        try:
                            await http.stream.send_all(head + body)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            self._end("refused")
                            return
                        result.sent_at = trio.current_time()
                    else:
                        http.push_back(event)
                told_close = await self._read(http)
            if result.ending is None:
                self._leave()
            elif plan.idle_after and result.ending == "complete" and not told_close:
                await self._idle(http)
        finally:
            for stream in self._streams:
                stream.close()  # type: ignore[attr-defined]

    async def _early(
        self, node: SimNode, http: HttpClient, early: EarlyRequest, behind: bytes | None
    ) -> tuple[HttpClient, bool]:
        """Send one early request and read its answer. Returns the connection for
        the next request (a new one if this one is closed) and whether the
        generation request (`behind`) already went out on it, pipelined."""
        world = self.world
        result = EarlyResult(early.kind, early.late_body)
        self.result.early.append(result)
        head, body = early_request(early, self._headers(key=early.kind != "unauthorized"), world)
        result.pipelined = early.pipelined and not early.late_body and behind is not None
        world.trace.add("client", self.plan.index, "early", early.kind, early.late_body)
        out = head if early.late_body else head + body
        if result.pipelined and behind is not None:
            out += behind
        http = await self._send(node, http, out)
        if result.pipelined:
            self.result.sent_at = trio.current_time()
        event = await self._answer(http, result)
        if isinstance(event, Closed) and result.status is None and self._reused:
            # The node closed the (idle) connection before answering: on a new one.
            self.result.early.pop()
            self._reconnected()
            self.result.early.append(result)
            http = self._connect(node)
            await http.stream.send_all(out)
            if result.pipelined:
                self.result.sent_at = trio.current_time()
            event = await self._answer(http, result)
        if early.late_body and isinstance(event, ResponseHead):
            # The answer began before the body was sent: the node answered without
            # reading it. Now the body, then the rest of the answer.
            try:
                await http.stream.send_all(body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            event = await self._answer(http, result)
        world.trace.add("client", self.plan.index, "answer", result.status, result.told_close)
        if isinstance(event, End) and not result.told_close:
            result.reused = True
            self._reused = True
            http.next_response()
            return http, result.pipelined
        # Closed, or told to close: the next request needs a new connection, and a
        # pipelined one that went out on this one was never answered: again.
        result.closed = isinstance(event, Closed)
        self.result.resent = result.pipelined
        http.stream.close()  # type: ignore[attr-defined]
        return self._connect(node), False

    async def _answer(self, http: HttpClient, result: EarlyResult) -> Event:
        """Read an early answer: up to its head when the body is still to be sent,
        else to its End (or Closed)."""
        while True:
            event = await http.next_event()
            if isinstance(event, ResponseHead):
                if result.status is None:
                    result.status = event.status
                    result.told_close = event.headers.get("connection", "").lower() == "close"
                    if result.late_body:
                        return event
            elif isinstance(event, End | Closed):
                return event

    async def _idle(self, http: HttpClient) -> None:
        """Keep the connection open and idle until the node closes it (or give up
        after its keep-alive timeout and some slack: the invariants say so)."""
        result, world = self.result, self.world
        result.idle_from = trio.current_time()
        limit = world.plan.scenario.http_keepalive_timeout + IDLE_SLACK
        with trio.move_on_after(limit):
            while True:
                try:
                    data = await http.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    result.idle_closed_at = trio.current_time()
                    break
        world.trace.add("client", self.plan.index, "idle", result.idle_closed_at)

    async def _read(self, http: HttpClient) -> bool:
        """Read the generation response; returns whether it said `connection: close`."""
        plan, result, world = self.plan, self.result, self.world
        decoder: SSEDecoder | NDJSONDecoder | WholeBodyDecoder = WholeBodyDecoder()
        told_close = False
        while True:
            if result.stalled_at is not None:
                # Stalled: nothing read (nor closed) for a few send timeouts; the node
                # should cut the connection meanwhile. Then it reads what is left.
                stall = STALL_FOR * world.plan.settings.send_timeout
                await trio.sleep_until(result.stalled_at + stall)
            event = await http.next_event()
            if result.first_byte_tick is None:
                result.first_byte_tick = world.trace.add("client", plan.index, "first-byte")
            if isinstance(event, ResponseHead):
                head = event
                result.status = head.status
                result.request_id = head.headers.get(REQUEST_ID_HEADER)
                told_close = head.headers.get("connection", "").lower() == "close"
                world.trace.add("client", plan.index, "status", head.status)
                if head.status == 200 and self.dialect.framing == "sse":
                    decoder = SSEDecoder()
                elif head.status == 200 and self.dialect.framing == "ndjson":
                    decoder = NDJSONDecoder()
            elif isinstance(event, Body):
                world.trace.add("client", plan.index, "data", len(event.data))
                for name, raw in decoder.feed(bytes(event.data)):
                    if name == "comment":
                        result.keepalives += 1
                        continue
                    payload = "[DONE]" if raw == "[DONE]" else loads(raw)
                    if payload is None:
                        result.bad.append(f"undecodable message {raw[:80]!r}")
                        continue
                    if self._signals(name, payload, result.status or 0):
                        self._leave()
                        return told_close
            elif isinstance(event, End):
                if isinstance(decoder, WholeBodyDecoder):
                    raw = decoder.finish()
                    payload = loads(raw)
                    self._signals(None, payload if payload is not None else raw, result.status or 0)
                elif decoder.leftover.strip():
                    result.bad.append(f"stream ended inside a message: {decoder.leftover[:80]!r}")
                self._end("complete")
                return told_close
            else:  # ConnectionClosed
                self._end("server_closed")
                return told_close

    def _signals(self, name: str | None, payload: object, status: int) -> bool:
        """Record what one message meant. True when the client should leave now."""
        plan, result = self.plan, self.result
        for signal in self.dialect.read(name, payload, status):
            if isinstance(signal, Text):
                if result.terminals:
                    result.after_terminal.append(signal)
                result.pieces.append(signal.text)
            elif isinstance(signal, Finish | Error):
                if result.terminals:
                    result.after_terminal.append(signal)
                else:
                    result.terminals.append(signal)
                    self.world.trace.add("client", plan.index, "terminal", signal)
            elif isinstance(signal, Done):
                result.done_marker = True
            elif isinstance(signal, Bad):
                result.bad.append(signal.detail)
        if plan.behavior == "leave_after_last" and result.terminals:
            return True
        if plan.behavior in ("leave_mid", "cancel_mid", "stall") and not result.terminals:
            if len(result.pieces) >= plan.leave_after_pieces:
                if plan.behavior == "leave_mid":
                    return True
                if plan.behavior == "stall" and result.stalled_at is None:
                    result.stalled_at = trio.current_time()
                    self.world.trace.add("client", plan.index, "stall")
                if result.cancel_sent_at is None and result.request_id is not None:
                    result.cancel_sent_at = trio.current_time()
                    self.world.spawn(self._cancel, self.client_id or result.request_id)
        return False

    async def _cancel(self, request_id: str) -> None:
        """POST /v1/cancel/{id} on a connection of its own: every other client
        asks the next node, not its own, so the cancel must cross the cluster."""
        plan, result = self.plan, self.result
        nodes = self.world.nodes
        result.cancel_node = (plan.node + plan.index) % len(nodes)
        stream = nodes[result.cancel_node].connect(plan)
        http = HttpClient(stream)
        try:
            path = CANCEL_PATH.format(id=request_id)
            await http.send_request("POST", path, b"", self._headers())
            while True:
                event = await http.next_event()
                if isinstance(event, ResponseHead):
                    result.cancel_status = event.status
                elif not isinstance(event, Body):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            stream.close()
        self.world.trace.add("client", plan.index, "cancel", result.cancel_status)

    def _leave(self) -> None:
        self.result.left_at = trio.current_time()
        self._end("left")
        self.world.client_left(self.plan, self.result)

    def _end(self, how: Ending) -> None:
        self.result.ending = how
        self.result.ended_at = trio.current_time()
        self.world.trace.add("client", self.plan.index, "end", how)


def early_request(
    early: EarlyRequest, headers: dict[str, str], world: World
) -> tuple[bytes, bytes]:
    """The head and body of an early request of this kind (on a kept-alive connection)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    method, path = "POST", "/v1/chat/completions"
    if early.kind == "not_found":
        # What the openai client's embeddings.create sends, to a route the node lacks.
        method, path = "POST", "/v1/embeddings"
        body = json.dumps({"model": MODEL, "input": "hi"})
    elif early.kind == "method":
        method = "PUT"
    elif early.kind == "too_large":
        body = json.dumps({"model": MODEL, "padding": "x" * world.plan.scenario.max_body_bytes})
    return request_bytes(method, path, body.encode(), headers, close=False)
