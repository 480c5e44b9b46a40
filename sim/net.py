"""The network between simulated nodes: PeerLinks' `listener` and `connector` seams
over in-memory pipes, and the faults that act on it.

Every node listens at its own address (`10.0.0.<index+1>:LINK_PORT`); a restarted
node listens at the same address. A connection is a `pipe_pair()` whose writes are
shaped (delayed, split) in the fault window like every other simulated stream.
The faults act on whole connections, as they do on TCP:

- `reset(a, b)`: every connection between the two nodes gets an RST; new
  connections go through at once (a blip of the control link only).
- `partition(a, b, until, "reset")`: RST, and connections are refused until the
  partition heals.
- `partition(a, b, until, "hold")`: nothing crosses until the partition heals,
  then everything does, in order (TCP retransmits); a connection attempted
  meanwhile completes at the heal. Links that wait longer than their heartbeat
  timeout close themselves.
- `crash(i, "process")`: the node's process died: its connections close (its
  peers read what was sent, then EOF) and its address refuses connections until
  it restarts. `crash(i, "machine")`: the machine vanished: its connections go
  silent for good (peers notice only by their heartbeat timeouts).

The simulated network knows which node dials (each node has its own connector), so
it can tell which connections a fault between two nodes cuts.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import trio

from sim.faults import link_shaper
from sim.pipes import PipeEnd, pipe_pair

if TYPE_CHECKING:
    from sim.world import World

LINK_PORT = 52416
PartitionMode = Literal["reset", "hold"]
CrashMode = Literal["process", "machine"]


def host_of(index: int) -> str:
    return f"10.0.0.{index + 1}"


def index_of(host: str) -> int:
    return int(host.rsplit(".", 1)[1]) - 1


@dataclass
class Connection:
    dialer: int
    acceptor: int
    client: PipeEnd
    server: PipeEnd

    def between(self, a: int, b: int) -> bool:
        return {self.dialer, self.acceptor} == {a, b}

    def touches(self, node: int) -> bool:
        return node in (self.dialer, self.acceptor)

    @property
    def dead(self) -> bool:
        return self.client.dead and self.server.dead


@dataclass
class Cut:
    mode: PartitionMode
    until: float


class SimListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, receive: trio.MemoryReceiveChannel[trio.abc.Stream]) -> None:
        self._receive = receive

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            # The node is going away; its task tree is being cancelled.
            await trio.sleep_forever()
            raise AssertionError("unreachable") from None

    async def aclose(self) -> None:
        await self._receive.aclose()


class SimNetwork:
    def __init__(self, world: World) -> None:
        self.world = world
        self.listeners: dict[int, trio.MemorySendChannel[trio.abc.Stream]] = {}
        self.connections: list[Connection] = []
        self.cuts: dict[frozenset[int], Cut] = {}
        self.down: set[int] = set()
        self.opened = 0

    # ---- the seams one node's PeerLinks gets ----

    def listener_for(
        self, index: int
    ) -> Callable[[str, int], Awaitable[Sequence[trio.abc.Listener[Any]]]]:
        async def listen(host: str, port: int) -> Sequence[trio.abc.Listener[Any]]:
            send, receive = trio.open_memory_channel[trio.abc.Stream](math.inf)
            self.listeners[index] = send
            self.down.discard(index)
            await trio.lowlevel.checkpoint()
            return [SimListener(receive)]

        return listen

    def connector_for(self, index: int) -> Callable[[str, int], Awaitable[trio.abc.Stream]]:
        async def connect(host: str, port: int) -> trio.abc.Stream:
            return await self._connect(index, index_of(host))

        return connect

    async def _connect(self, source: int, target: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        pair = frozenset((source, target))
        while True:
            cut = self.cuts.get(pair)
            if cut is None or cut.until <= trio.current_time():
                break
            if cut.mode == "reset":
                raise ConnectionRefusedError(f"node {target} is unreachable (partition)")
            await trio.sleep_until(cut.until)  # the SYN is retransmitted until the heal
        channel = self.listeners.get(target)
        if channel is None or target in self.down:
            raise ConnectionRefusedError(f"nothing listens at {host_of(target)}:{LINK_PORT}")
        world = self.world
        plan = world.plan
        faults = plan.cluster
        delay = plan.settings.link_delay_max
        self.opened += 1
        capacity = plan.settings.link_capacity
        slow = plan.swarm.slow_links  # a slow network all along, not a fault
        shapers = [
            link_shaper(
                world.choices, world.window, faults.link_delay_p, faults.link_split_p, delay, slow
            )
            for _ in range(2)
        ]
        client, server = pipe_pair(
            capacity_ab=capacity,
            capacity_ba=capacity,
            shaper_ab=shapers[0],
            shaper_ba=shapers[1],
            address_a=(host_of(source), 30000 + self.opened),
            address_b=(host_of(target), LINK_PORT),
        )
        self.connections = [c for c in self.connections if not c.dead]
        self.connections.append(Connection(source, target, client, server))
        channel.send_nowait(server)
        return client

    # ---- faults ----

    def _between(self, a: int, b: int) -> list[Connection]:
        return [c for c in self.connections if c.between(a, b) and not c.dead]

    def reset(self, a: int, b: int) -> int:
        """RST every connection between a and b; returns how many."""
        conns = self._between(a, b)
        for conn in conns:
            conn.client.reset()
        return len(conns)

    def partition(self, a: int, b: int, until: float, mode: PartitionMode) -> int:
        pair = frozenset((a, b))
        current = self.cuts.get(pair)
        if current is None or current.until < until:
            self.cuts[pair] = Cut(mode, until)
        conns = self._between(a, b)
        for conn in conns:
            if mode == "reset":
                conn.client.reset()
            else:
                conn.client.hold(until)
        return len(conns)

    def partitioned(self, a: int, b: int) -> bool:
        cut = self.cuts.get(frozenset((a, b)))
        return cut is not None and cut.until > trio.current_time()

    def crash(self, index: int, mode: CrashMode) -> None:
        self.down.add(index)
        channel = self.listeners.pop(index, None)
        if channel is not None:
            channel.close()
        for conn in self.connections:
            if not conn.touches(index) or conn.dead:
                continue
            mine = conn.client if conn.dialer == index else conn.server
            if mode == "machine":
                mine.vanish()
            else:
                mine.close()
