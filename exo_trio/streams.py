"""The streams registry: one receive channel per in-flight request.

The rule this module exists for (DESIGN.md, "The bug this project exists to make
impossible"): a request's channel is opened and registered *synchronously*, before
its command is dispatched, so there is no window in which an event can arrive for
a request that has no channel. Delivery is synchronous too and can never block or
be refused for lack of room: the buffer holds every event the request can produce
(one chunk per token, up to max_tokens, plus one terminal event).

Events for ids that have no channel are never dropped silently: they are counted,
split into "late" (the request was closed first, e.g. the client went away while
the runner was still finishing its step) and "unknown" (never registered, a bug),
and logged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import trio

from exo_trio.observer import Observer
from exo_trio.types import (
    ChunkGenerated,
    FailureKind,
    GenerationEvent,
    GenerationFailed,
    TerminalEvent,
    is_terminal,
)

log = logging.getLogger(__name__)

# How many closed request ids to remember, to tell a late event from an unknown one.
RECENTLY_CLOSED = 4096


class StreamViolation(Exception):
    """An event broke the per-request contract: a gap, a duplicate, a reordering,
    a chunk after the terminal event, or a full buffer. Never expected; fatal for
    the request and loud, because it means a token was lost or invented."""


class RequestStream:
    """The receiving end of one request. Checks sequence numbers as it reads, so a
    gap or a duplicate anywhere upstream surfaces here as a StreamViolation."""

    def __init__(self, request_id: str, receive: trio.MemoryReceiveChannel[GenerationEvent]):
        self.request_id = request_id
        self._receive = receive
        self.chunks_received = 0
        self.terminal: TerminalEvent | None = None

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    @property
    def reader_waiting(self) -> bool:
        """Is a task waiting on this stream right now?"""
        return self._receive.statistics().tasks_waiting_receive > 0

    async def receive(self) -> GenerationEvent:
        if self.terminal is not None:
            raise StreamViolation(f"{self.request_id}: read past the terminal event")
        try:
            event = await self._receive.receive()
        except trio.EndOfChannel:
            # The registry closed the channel without a terminal event: the request
            # broke (an overflow). Fail this request loudly; the node carries on.
            raise StreamViolation(
                f"{self.request_id}: the stream broke before its terminal event"
            ) from None
        self._check(event)
        return event

    def poll(self) -> GenerationEvent | None:
        """The next event if one is already here, else None (never waits)."""
        if self.terminal is not None:
            raise StreamViolation(f"{self.request_id}: read past the terminal event")
        try:
            event = self._receive.receive_nowait()
        except trio.WouldBlock:
            return None
        except trio.EndOfChannel:
            raise StreamViolation(
                f"{self.request_id}: the stream broke before its terminal event"
            ) from None
        self._check(event)
        return event

    def _check(self, event: GenerationEvent) -> None:
        if isinstance(event, ChunkGenerated):
            if event.seq != self.chunks_received:
                raise StreamViolation(
                    f"{self.request_id}: expected chunk seq {self.chunks_received}, got {event.seq}"
                )
            self.chunks_received += 1
            return
        chunks = getattr(event, "chunks", None)
        if chunks is not None and chunks != self.chunks_received:
            raise StreamViolation(
                f"{self.request_id}: terminal event says {chunks} chunks, "
                f"received {self.chunks_received}"
            )
        self.terminal = event

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self.terminal is not None:
            raise StopAsyncIteration
        return await self.receive()


@dataclass
class _Entry:
    send: trio.MemorySendChannel[GenerationEvent]
    stream: RequestStream
    capacity: int
    delivered: int = 0
    # A terminal event has been delivered (by the runner, or by `cancel`).
    ended: bool = False
    # Ended here by `cancel`, not by the runner: what the runner still sends for it
    # (tokens already in the pipe) is late, not a protocol violation.
    cancelled: bool = False
    # The channel overflowed (a runner sent more than the request can produce).
    broken: bool = False


@dataclass
class RegistryStats:
    """The registry's counters; `statistics()` hands out a snapshot with the open
    ids, as Trio's channels do."""

    opened: int = 0
    closed: int = 0
    delivered: int = 0
    late_events: int = 0
    unknown_events: int = 0
    overflows: int = 0
    after_terminal: int = 0
    late_by_kind: dict[str, int] = field(default_factory=dict)
    open_ids: tuple[str, ...] = ()


class StreamRegistry:
    """Maps request ids to their channels. Every method is synchronous on purpose:
    opening, delivering and closing never yield to the scheduler, so no other task
    can run between "registered" and "dispatched"."""

    def __init__(self, observer: Observer | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self._recently_closed: OrderedDict[str, None] = OrderedDict()
        self._stats = RegistryStats()
        self._observer = observer or Observer()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def open(self, request_id: str, max_tokens: int) -> RequestStream:
        """Register a channel with room for every event the request can produce."""
        if request_id in self._entries:
            raise ValueError(f"request id {request_id!r} is already open")
        capacity = max_tokens + 1  # one chunk per token, then one terminal event
        send, receive = trio.open_memory_channel[GenerationEvent](capacity)
        stream = RequestStream(request_id, receive)
        self._entries[request_id] = _Entry(send, stream, capacity)
        self._stats.opened += 1
        return stream

    def deliver(self, event: GenerationEvent) -> bool:
        """Hand an event to its request. Returns False (after counting and logging)
        when the request has no channel."""
        entry = self._entries.get(event.request_id)
        if entry is None:
            self._count_orphan(event)
            return False
        if isinstance(event, ChunkGenerated) and event.seq == 0:
            self._observer.first_chunk(event.request_id, entry.stream.reader_waiting)
        try:
            entry.send.send_nowait(event)
        except trio.WouldBlock:
            # Impossible by construction (capacity covers every event); if it happens
            # the request is broken, so end it loudly rather than lose data silently.
            # Impossible by construction; if it happens, this one request is broken:
            # its consumer reads what was delivered, then a StreamViolation. Raising
            # here instead would take the delivering worker, and the node, down.
            self._stats.overflows += 1
            log.error("request %s: channel full (capacity %d)", event.request_id, entry.capacity)
            entry.broken = True
            entry.send.close()
            return False
        except trio.ClosedResourceError:
            if entry.broken:
                self._stats.overflows += 1
                return False
            if entry.cancelled:
                self._count_late(event)
                return False
            # The request already had its terminal event: anything after it is a
            # protocol violation upstream (a duplicate terminal or a stray chunk).
            self._stats.after_terminal += 1
            log.error("%s after the terminal event of %s", type(event).__name__, event.request_id)
            return False
        except trio.BrokenResourceError:
            # The receiver is gone (its scope closed the receive end) but has not
            # unregistered yet: that is a close in progress, so this is a late event.
            self._count_orphan(event)
            return False
        entry.delivered += 1
        self._stats.delivered += 1
        if is_terminal(event):
            # Nothing may follow a terminal event: close the send side now, so a
            # second terminal or a stray chunk shows up as late, not as data.
            entry.ended = True
            entry.send.close()
        return True

    def cancel(self, request_id: str, message: str, kind: FailureKind = "cancelled") -> bool:
        """End an open request from the node's side (POST /v1/cancel, or a shutdown):
        its consumer reads what was already delivered, then a failure of this `kind`
        as its terminal event. Returns
        False if the request is not open or already has its terminal event. The
        caller must also stop the runner's work on it."""
        entry = self._entries.get(request_id)
        if entry is None or entry.ended:
            return False
        entry.cancelled = True
        return self.deliver(GenerationFailed(request_id=request_id, kind=kind, message=message))

    def close(self, request_id: str) -> None:
        """Unregister and close. Idempotent: called from `finally` blocks."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        entry.send.close()
        entry.stream._receive.close()
        self._stats.closed += 1
        self._recently_closed[request_id] = None
        if len(self._recently_closed) > RECENTLY_CLOSED:
            self._recently_closed.popitem(last=False)

    def open_ids(self) -> list[str]:
        return list(self._entries)

    def pending(self, request_id: str) -> int:
        """Events delivered to an open request and not read yet (0 if not open)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return 0
        return entry.stream._receive.statistics().current_buffer_used

    def statistics(self) -> RegistryStats:
        """A snapshot of the counters and of the requests open now."""
        return replace(
            self._stats, late_by_kind=dict(self._stats.late_by_kind), open_ids=tuple(self._entries)
        )

    def _count_late(self, event: GenerationEvent) -> None:
        kind = type(event).__name__
        self._stats.late_events += 1
        self._stats.late_by_kind[kind] = self._stats.late_by_kind.get(kind, 0) + 1
        log.debug("late %s for ended request %s", kind, event.request_id)

    def _count_orphan(self, event: GenerationEvent) -> None:
        kind = type(event).__name__
        if event.request_id in self._recently_closed:
            self._count_late(event)
        else:
            self._stats.unknown_events += 1
            log.warning("%s for unknown request %s", kind, event.request_id)
