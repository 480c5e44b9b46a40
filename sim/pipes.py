"""Simulated byte streams: HTTP connections and runner pipes, in memory.

A `pipe_pair()` is two `trio.abc.HalfCloseableStream` ends joined by two
directions. Each direction is a FIFO of byte segments with virtual delivery times:
a write may be split into several segments (each delivered at its own time) and
delayed, but bytes are never reordered within a direction (it models TCP or a
pipe). Different connections are delayed independently, so what the *system*
sees can be reordered: a cancel racing a runner's tokens, one client's bytes
overtaking another's.

Semantics the production code relies on, modelled like a socket:

- `send_all` is atomic with respect to cancellation: it either queues every byte
  (and returns without another scheduling point) or queues nothing. A direction
  holds at most `capacity` bytes in flight; a writer waits for room (a slow
  reader pushes back on the server, as a full socket buffer would).
- `aclose` of one end is a FIN for its outgoing direction (the peer reads what was
  sent, then EOF) and makes the peer's later writes fail (BrokenResourceError).
- Each end has a fake `.socket` so hypercorn can ask for the peer and local
  addresses.

Network faults between nodes act on whole connections, as they do on TCP:
`reset()` is an RST (both ends fail at once: reads and writes raise
BrokenResourceError, whatever was in flight is lost); `hold(until)` is a
partition that TCP rides out (nothing is delivered before `until`, then
everything, in order, as retransmission would; `math.inf`: a machine that
vanished).
"""

from __future__ import annotations

import math
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio
from trio.lowlevel import ParkingLot, checkpoint

# Splits one write into segments with delivery delays: returns [(size, delay), ...].
Shaper = Callable[[int], list[tuple[int, float]]]


def no_shaping(size: int) -> list[tuple[int, float]]:
    return [(size, 0.0)]


@dataclass
class DirectionStats:
    writes: int = 0
    bytes: int = 0
    blocked_writes: int = 0


class _Direction:
    def __init__(self, capacity: int, shaper: Shaper) -> None:
        self.capacity = capacity
        self.shaper = shaper
        self.segments: deque[tuple[float, bytes]] = deque()
        self.buffered = 0
        self.last_at = 0.0
        self.eof_at: float | None = None  # set when the writer closes
        self.reader_closed = False
        self.broken = False  # reset: both ends fail
        self.hold_until = 0.0  # nothing is delivered before this (a partition)
        self.readable = ParkingLot()
        self.writable = ParkingLot()
        self.stats = DirectionStats()

    def wake_all(self) -> None:
        self.readable.unpark_all()
        self.writable.unpark_all()


class _FakeSocket:
    family = socket.AF_INET

    def __init__(self, local: tuple[str, int], peer: tuple[str, int]) -> None:
        self._local, self._peer = local, peer

    def getsockname(self) -> tuple[str, int]:
        return self._local

    def getpeername(self) -> tuple[str, int]:
        return self._peer


class PipeEnd(trio.abc.HalfCloseableStream):
    def __init__(self, outgoing: _Direction, incoming: _Direction, sock: _FakeSocket) -> None:
        self._out = outgoing
        self._in = incoming
        self.socket = sock
        self.closed = False
        self.vanished = False

    @property
    def sent_stats(self) -> DirectionStats:
        return self._out.stats

    # ---- sending ----

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        out = self._out
        await checkpoint()
        size = len(data)
        while True:
            if self.closed or out.eof_at is not None:
                raise trio.ClosedResourceError("this end is closed for sending")
            if out.broken:
                raise trio.BrokenResourceError("connection reset")
            if out.reader_closed:
                raise trio.BrokenResourceError("the peer closed its end")
            if out.buffered == 0 or out.buffered + size <= out.capacity:
                break
            out.stats.blocked_writes += 1
            await out.writable.park()
        if not size:
            return
        # From here on nothing awaits: the write is queued whole or not at all.
        now = trio.current_time()
        payload = bytes(data)
        offset = 0
        for piece, delay in out.shaper(size):
            at = max(out.last_at, now + delay)
            out.segments.append((at, payload[offset : offset + piece]))
            out.last_at = at
            offset += piece
        out.buffered += size
        out.stats.writes += 1
        out.stats.bytes += size
        out.readable.unpark_all()

    def write_now(self, data: bytes) -> None:
        """Queue bytes at once, ignoring capacity (a dying process's last write)."""
        out = self._out
        if self.closed or out.eof_at is not None or out.reader_closed or out.broken or not data:
            return
        out.last_at = max(out.last_at, trio.current_time())
        out.segments.append((out.last_at, bytes(data)))
        out.buffered += len(data)
        out.readable.unpark_all()

    async def wait_send_all_might_not_block(self) -> None:
        out = self._out
        await checkpoint()
        while (
            out.buffered >= out.capacity
            and not out.reader_closed
            and not out.broken
            and not self.closed
        ):
            await out.writable.park()

    async def send_eof(self) -> None:
        await checkpoint()
        self._finish_sending()

    def _finish_sending(self) -> None:
        out = self._out
        if out.eof_at is None:
            out.eof_at = max(out.last_at, trio.current_time())
            out.readable.unpark_all()

    # ---- receiving ----

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        incoming = self._in
        limit = max_bytes or 65536
        first = True
        while True:
            if self.closed:
                raise trio.ClosedResourceError("this end is closed")
            if incoming.broken:
                raise trio.BrokenResourceError("connection reset")
            now = trio.current_time()
            segments = incoming.segments
            hold = incoming.hold_until
            if segments:
                at = segments[0][0]
                if hold > at:
                    at = hold
                if at > now:
                    first = False
                    await self._wait_until(at)
                    continue
                if first:
                    # A receive that finds data at once is still a checkpoint.
                    first = False
                    await checkpoint()
                    continue
                return self._take(now, limit)
            if incoming.eof_at is not None:
                at = max(incoming.eof_at, hold)
                if at > now:
                    first = False
                    await self._wait_until(at)
                    continue
                if first:
                    await checkpoint()
                return b""
            first = False
            await incoming.readable.park()

    async def _wait_until(self, at: float) -> None:
        """Sleep until `at` (then the caller looks again: a hold may have moved it,
        a reset may have come). Held forever (a vanished machine): park until
        something changes."""
        if at == math.inf:
            await self._in.readable.park()
        else:
            await trio.sleep_until(at)

    def _take(self, now: float, limit: int) -> bytes:
        incoming = self._in
        segments = incoming.segments
        parts = []
        taken = 0
        while segments and segments[0][0] <= now and taken < limit:
            at, data = segments[0]
            room = limit - taken
            if len(data) > room:
                segments[0] = (at, data[room:])
                data = data[:room]
            else:
                segments.popleft()
            parts.append(data)
            taken += len(data)
        incoming.buffered -= taken
        incoming.writable.unpark_all()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ---- closing ----

    async def aclose(self) -> None:
        self.close()
        await checkpoint()

    def close(self) -> None:
        """Synchronous close: FIN outgoing, refuse incoming (the peer's writes break)."""
        if self.closed:
            return
        if self.vanished:
            # Its machine is gone: nothing it does reaches the peer any more.
            self.closed = True
            return
        self._finish_sending()
        self.closed = True
        incoming = self._in
        incoming.reader_closed = True
        incoming.segments.clear()
        incoming.buffered = 0
        incoming.wake_all()
        self._out.wake_all()

    # ---- network faults (both directions of the connection) ----

    def reset(self) -> None:
        """An RST: both ends fail at once; whatever was in flight is lost."""
        for direction in (self._out, self._in):
            direction.broken = True
            direction.segments.clear()
            direction.buffered = 0
            direction.wake_all()

    def hold(self, until: float) -> None:
        """A partition TCP rides out: nothing arrives either way before `until`."""
        for direction in (self._out, self._in):
            direction.hold_until = max(direction.hold_until, until)
            direction.wake_all()

    def vanish(self) -> None:
        """This end's machine vanished: from now on the peer hears nothing from it,
        not even a close; the peer's bytes are accepted and never read."""
        self.hold(math.inf)
        self.vanished = True

    @property
    def dead(self) -> bool:
        return self._out.broken or (self.closed and self._out.reader_closed)


def pipe_pair(
    *,
    capacity_ab: int = 1 << 16,
    capacity_ba: int = 1 << 16,
    shaper_ab: Shaper = no_shaping,
    shaper_ba: Shaper = no_shaping,
    address_a: tuple[str, int] = ("10.0.0.2", 40000),
    address_b: tuple[str, int] = ("10.0.0.1", 52415),
) -> tuple[PipeEnd, PipeEnd]:
    """Two connected ends: a's writes go to b (shaped by shaper_ab) and back."""
    ab = _Direction(capacity_ab, shaper_ab)
    ba = _Direction(capacity_ba, shaper_ba)
    a = PipeEnd(ab, ba, _FakeSocket(address_a, address_b))
    b = PipeEnd(ba, ab, _FakeSocket(address_b, address_a))
    return a, b
