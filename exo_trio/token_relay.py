"""Moving a request's events between nodes, exactly once and in order.

The node that owns a request (its HTTP client is connected there) registers the
request's channel, then sends RemoteGenerate to the node hosting the instance's
rank 0 (the entry node). The entry node submits it to its runner and relays every
event back as RemoteEvents. Links are TCP, so events arrive in order while a link
lives; across a reconnect some may be lost or repeated. So:

- every event has a number: a chunk's `seq`, and the terminal event's number is the
  chunk count, so the owner can drop duplicates and notice gaps;
- the entry node keeps each request's unacknowledged events in a bounded buffer
  and the owner acknowledges cumulatively (RemoteAck);
- after a reconnect the entry node re-sends every unacknowledged event at once,
  before anything new can go out on the new link (so the owner never sees a
  newer event before an older one that was lost with the old link), and the owner
  asks for everything from its next expected number (RemoteResume) in case the
  entry node did not notice the reconnect;
- a request one side no longer knows is settled explicitly: a RemoteResume for a
  request the entry node does not know (its RemoteGenerate was lost with a link,
  or the entry node restarted) is answered with a GenerationFailed, and events for
  a request the owner no longer routes (it ended, its cancel or last ack was lost
  with a link, or it belonged to the owner's previous incarnation) are answered
  with a RemoteCancel, so no side waits or buffers forever;
- a peer lost for good (the caller decides when: after a grace period) ends every
  affected request with an explicit GenerationFailed.

Everything here is synchronous and does no I/O of its own: `send` puts a message
in a link's outbox. That keeps "registered before dispatched" true across nodes too.
Events for this node's own requests are not delivered from here: the methods that
produce them return them, in order, and the Router (router.py) hands them to the
streams registry, so the path back up reads in the Router's calls.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from exo_trio.cluster_messages import (
    ClusterMessage,
    RemoteAck,
    RemoteCancel,
    RemoteEvents,
    RemoteGenerate,
    RemoteResume,
)
from exo_trio.types import (
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    TextGeneration,
    is_terminal,
)
from exo_trio.worker import RunnerUnavailable

log = logging.getLogger(__name__)

# Events an entry node keeps per request until the owner acknowledges them. A
# request that outruns its owner's acks by this much is ended with an error.
BUFFER_LIMIT = 4096
# The owner acknowledges after this many events (and always at the terminal).
ACK_EVERY = 32
RECENT = 4096


# What became of a local runner's event (TokenRelay.relay_event).
Relayed = Literal["here", "relayed", "late", "overflow"]


def event_number(event: GenerationEvent) -> int | None:
    """A chunk's seq; None for a terminal (its number is the chunk count)."""
    return event.seq if isinstance(event, ChunkGenerated) else None


@dataclass
class _Route:
    """Owner side: a request of ours running on another node."""

    entry_node: str
    next_event: int = 0
    acked: int = 0


@dataclass
class _Outgoing:
    """Entry side: a request from another node running here."""

    origin: str
    base: int = 0  # number of the first buffered event
    events: list[GenerationEvent] = field(default_factory=list)
    finished: bool = False


@dataclass
class RelayStats:
    """The relay's counters; `statistics()` hands out a snapshot with the requests
    it holds."""

    sent: int = 0
    resent: int = 0
    duplicates: int = 0
    gaps: int = 0
    overflows: int = 0
    late: int = 0
    acks: int = 0  # acknowledgements sent before the terminal event (owner side)
    trims: int = 0  # acknowledgements that freed buffered events (entry side)
    unrouted: int = 0  # events for a request the owner no longer routes (answered: cancel)
    resume_unknown: int = 0  # resumes for a request the entry does not have (answered: failed)
    routes: tuple[str, ...] = ()  # owner side: our requests running elsewhere
    outgoing: tuple[str, ...] = ()  # entry side: others' requests running here


class TokenRelay:
    def __init__(
        self,
        node_id: str,
        send: Callable[[str, ClusterMessage], bool],
        *,
        buffer_limit: int = BUFFER_LIMIT,
        ack_every: int = ACK_EVERY,
    ) -> None:
        self.node_id = node_id
        self._send = send
        self._buffer_limit = buffer_limit
        self._ack_every = ack_every
        self.routes: dict[str, _Route] = {}
        self.outgoing: dict[str, _Outgoing] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._stats = RelayStats()

    def statistics(self) -> RelayStats:
        return replace(self._stats, routes=tuple(self.routes), outgoing=tuple(self.outgoing))

    # ---- owner side ----

    def dispatch(self, entry_node: str, instance_id: str, command: TextGeneration) -> None:
        """Send a registered request to its entry node. Raises RunnerUnavailable (and
        records nothing) when the link to that node is down."""
        message = RemoteGenerate(origin=self.node_id, instance_id=instance_id, command=command)
        if not self._send(entry_node, message):
            raise RunnerUnavailable(f"node {entry_node} is not reachable")
        self.routes[command.request_id] = _Route(entry_node)

    def cancel(self, request_id: str) -> None:
        """The owner's request ended early: stop the remote work."""
        route = self.routes.pop(request_id, None)
        if route is not None:
            self._send(route.entry_node, RemoteCancel(request_id=request_id))

    def forget(self, request_id: str) -> None:
        """The owner's request ended normally: no more events are expected."""
        self.routes.pop(request_id, None)

    def on_events(self, peer: str, message: RemoteEvents) -> list[GenerationEvent]:
        """Events of one of our requests from its entry node: returns the ones to
        deliver, in order (duplicates dropped; a gap ends the request instead)."""
        route = self.routes.get(message.request_id)
        if route is None or route.entry_node != peer:
            self._stats.late += len(message.events)
            if route is None:
                # Nobody here waits for it: our cancel or last ack may have been lost
                # with a link, or it is our previous incarnation's. Let the entry
                # node stop and forget it.
                self._stats.unrouted += 1
                self._send(peer, RemoteCancel(request_id=message.request_id))
            return []
        deliver: list[GenerationEvent] = []
        for event in message.events:
            number = event_number(event)
            expected = route.next_event
            if number is not None and number < expected:
                self._stats.duplicates += 1
                continue
            if number is not None and number > expected:
                # Cannot happen while the entry node re-sends from our next number;
                # if it does, the stream is broken: end it loudly.
                self._stats.gaps += 1
                deliver.append(
                    self._fail(message.request_id, f"lost events {expected}..{number - 1}")
                )
                return deliver
            deliver.append(event)
            if is_terminal(event):
                self.routes.pop(message.request_id, None)
                self._send(peer, RemoteAck(request_id=message.request_id, upto=expected + 1))
                return deliver
            route.next_event += 1
            if route.next_event - route.acked >= self._ack_every:
                route.acked = route.next_event
                self._stats.acks += 1
                self._send(peer, RemoteAck(request_id=message.request_id, upto=route.acked))
        return deliver

    def on_peer_up(self, peer: str) -> None:
        """A link came (back) up. Called before anything else can be sent on it."""
        # Entry side: whatever the old link may have lost goes first, ahead of any
        # new event (the owner drops what it already has).
        for request_id, out in self.outgoing.items():
            if out.origin == peer and out.events:
                self._stats.resent += len(out.events)
                self._send(peer, RemoteEvents(request_id=request_id, events=tuple(out.events)))
        # Owner side: ask for whatever may have been lost while it was down.
        for request_id, route in self.routes.items():
            if route.entry_node == peer:
                self._send(peer, RemoteResume(request_id=request_id, next_event=route.next_event))

    def fail_routes(self, peer: str, reason: str) -> list[GenerationFailed]:
        """The entry node is gone for good: end every request routed to it (returns
        their failures, to deliver)."""
        lost = [rid for rid, route in self.routes.items() if route.entry_node == peer]
        return [self._fail(request_id, reason) for request_id in lost]

    def _fail(self, request_id: str, reason: str) -> GenerationFailed:
        self.routes.pop(request_id, None)
        return GenerationFailed(request_id=request_id, kind="peer_lost", message=reason)

    # ---- entry side ----

    def accept(self, peer: str, message: RemoteGenerate) -> None:
        """Record a remote request before it is submitted, so its first events
        find their way back."""
        self.outgoing[message.command.request_id] = _Outgoing(origin=peer)

    def relay_event(self, event: GenerationEvent) -> Relayed:
        """An event of a local runner: "relayed" to its owner if it belongs to
        another node's request, or counted "late" if that request was given up.
        "here": it is this node's own request's, the caller delivers it. "overflow":
        the owner stopped acknowledging, so the request was ended with an error
        instead, and the caller must stop its runner work."""
        out = self.outgoing.get(event.request_id)
        if out is None:
            if event.request_id in self._cancelled:
                self._stats.late += 1
                return "late"
            return "here"
        if out.finished:
            self._stats.late += 1
            return "late"
        outcome: Relayed = "relayed"
        if len(out.events) >= self._buffer_limit and not is_terminal(event):
            self._stats.overflows += 1
            event = GenerationFailed(
                request_id=event.request_id,
                kind="peer_lost",
                message=f"node {out.origin} stopped acknowledging events",
            )
            # The runner goes on until its cancel arrives: what it still sends is late.
            self._remember_cancelled(event.request_id)
            outcome = "overflow"
        out.events.append(event)
        out.finished = is_terminal(event)
        self._stats.sent += 1
        self._send(out.origin, RemoteEvents(request_id=event.request_id, events=(event,)))
        return outcome

    def on_ack(self, peer: str, message: RemoteAck) -> None:
        out = self.outgoing.get(message.request_id)
        if out is None or out.origin != peer:
            return
        drop = min(max(0, message.upto - out.base), len(out.events))
        if drop:
            self._stats.trims += 1
        del out.events[:drop]
        out.base += drop
        if out.finished and not out.events:
            del self.outgoing[message.request_id]

    def on_resume(self, peer: str, message: RemoteResume) -> None:
        out = self.outgoing.get(message.request_id)
        if out is None:
            # Never arrived here (its RemoteGenerate was lost with a link), lost with
            # this node's previous incarnation, or given up on after the grace: the
            # owner still waits for it, so end it explicitly.
            self._stats.resume_unknown += 1
            failed = GenerationFailed(
                request_id=message.request_id,
                kind="peer_lost",
                message=f"node {self.node_id} does not have this request",
            )
            self._send(peer, RemoteEvents(request_id=message.request_id, events=(failed,)))
            return
        if out.origin != peer:
            return
        start = max(0, message.next_event - out.base)
        if message.next_event < out.base:
            log.error(
                "resume of %s from %d below buffer base %d",
                message.request_id,
                message.next_event,
                out.base,
            )
        events = tuple(out.events[start:])
        if events:
            self._stats.resent += len(events)
            self._send(peer, RemoteEvents(request_id=message.request_id, events=events))

    def on_cancel(self, peer: str, message: RemoteCancel) -> bool:
        """Returns True if the request was ours to cancel (the caller then stops
        the runner work)."""
        out = self.outgoing.get(message.request_id)
        if out is None or out.origin != peer:
            return False
        del self.outgoing[message.request_id]
        self._remember_cancelled(message.request_id)
        return not out.finished

    def drop_origin(self, peer: str) -> list[str]:
        """The owner is gone for good: forget its requests; returns the ids whose
        runner work must be cancelled."""
        ids = [rid for rid, out in self.outgoing.items() if out.origin == peer]
        running = []
        for rid in ids:
            out = self.outgoing.pop(rid)
            self._remember_cancelled(rid)
            if not out.finished:
                running.append(rid)
        return running

    def _remember_cancelled(self, request_id: str) -> None:
        self._cancelled[request_id] = None
        if len(self._cancelled) > RECENT:
            self._cancelled.popitem(last=False)
