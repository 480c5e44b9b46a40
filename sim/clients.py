"""Simulated HTTP clients: one request each, over a simulated connection to a node.

A client sends its dialect's request, decodes the response as it arrives and
records what it saw (text pieces, terminal events, the end-of-stream marker, the
ids it was told) in a ClientResult, which the invariants compare against the
fake runner's ledger. Its plan says how it behaves: read at once, read slowly,
disconnect before the first chunk, mid-stream or right after the terminal event,
or ask for its request to be cancelled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio

from sim.dialects import DIALECTS, Bad, Dialect, Done, Error, Finish, Signal, Text
from sim.encoder import tag_text
from sim.http import (
    Body,
    End,
    HttpClient,
    NDJSONDecoder,
    ResponseHead,
    SSEDecoder,
    WholeBodyDecoder,
    loads,
)
from sim.scenario import ClientPlan

if TYPE_CHECKING:
    from sim.world import World

REQUEST_ID_HEADER = "x-request-id"
CANCEL_PATH = "/v1/cancel/{id}"

Ending = Literal["complete", "server_closed", "left", "refused"]


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

    async def run(self) -> None:
        plan, result, world = self.plan, self.result, self.world
        assert world.t0 is not None
        await trio.sleep_until(world.t0 + plan.start)
        node = world.nodes[plan.node]
        result.server = node
        stream = node.connect(plan)
        http = HttpClient(stream)
        body = json.dumps(self.dialect.body(prompt_for(plan), plan.max_tokens)).encode()
        headers = {"X-Request-Id": self.client_id} if self.client_id else None
        try:
            try:
                await http.send_request(self.dialect.method, self.dialect.path, body, headers)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._end("refused")
                return
            result.sent_at = trio.current_time()
            world.trace.add("client", plan.index, "sent", self.dialect.name)
            if plan.behavior == "leave_before_first":
                await trio.sleep(plan.leave_after_time / 10)
                self._leave()
                return
            deadline = math.inf
            if plan.behavior == "leave_mid" and not self.dialect.streaming:
                deadline = trio.current_time() + plan.leave_after_time
            with trio.move_on_at(deadline):
                await self._read(http)
                return
            self._leave()
        finally:
            stream.close()

    async def _read(self, http: HttpClient) -> None:
        plan, result, world = self.plan, self.result, self.world
        decoder: SSEDecoder | NDJSONDecoder | WholeBodyDecoder = WholeBodyDecoder()
        while True:
            if plan.read_pause_max:
                await trio.sleep(world.choices.between(0.0, plan.read_pause_max))
            event = await http.next_event()
            if result.first_byte_tick is None:
                result.first_byte_tick = world.trace.add("client", plan.index, "first-byte")
            if isinstance(event, ResponseHead):
                head = event
                result.status = head.status
                result.request_id = head.headers.get(REQUEST_ID_HEADER)
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
                        return
            elif isinstance(event, End):
                if isinstance(decoder, WholeBodyDecoder):
                    raw = decoder.finish()
                    payload = loads(raw)
                    self._signals(None, payload if payload is not None else raw, result.status or 0)
                elif decoder.leftover.strip():
                    result.bad.append(f"stream ended inside a message: {decoder.leftover[:80]!r}")
                self._end("complete")
                return
            else:  # ConnectionClosed
                self._end("server_closed")
                return

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
        if plan.behavior in ("leave_mid", "cancel_mid") and not result.terminals:
            if len(result.pieces) >= plan.leave_after_pieces:
                if plan.behavior == "leave_mid":
                    return True
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
            await http.send_request("POST", CANCEL_PATH.format(id=request_id), b"")
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
