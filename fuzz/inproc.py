"""A whole node in this process: the production node on in-memory streams.

The API fuzz targets and the timeout tests drive the real request path (h11 in
hypercorn, api/serving.py with its send timeout, the ExchangeScope middleware,
quart-trio, the dialect adapters, the shared lifecycle, the streams registry, the
Router, the Worker and the framed runner protocol) of a node built by
`assembly.build_node` exactly as the daemon builds one (a lone node: it leads
itself and places its model on itself). Only the effects are swapped: HTTP
connections are in-memory streams pushed to the API's listener (no sockets, so
it runs under MockClock too), the links listen nowhere, and the runner is
`sim.fake_runner`, which speaks the real protocol and emits a deterministic token
per (request, seq).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from exo_trio.api.app import ApiSettings
from exo_trio.api.serving import Bound
from exo_trio.assembly import AssembledNode, NodeEffects, NodeSetup, build_node
from exo_trio.cluster import ClusterSettings
from exo_trio.cluster_messages import InstanceSpec, ModelInfo
from exo_trio.node import ModelCard, Node, ServedModel
from exo_trio.prompts import PromptEncoder
from exo_trio.seams import Seams
from exo_trio.streams import StreamRegistry
from exo_trio.worker import Launcher, Worker
from sim.fake_runner import FakeRunner, fake_text, fake_token
from sim.world import hypercorn_config

MODEL = "demo"
NODE_ID = "inproc"


class FakeSocket:
    """What hypercorn asks a connection's socket: its family and both addresses."""

    family = socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 40000)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 52415)


class MemoryConnection(trio.abc.HalfCloseableStream):
    """The server's end of an in-memory HTTP connection, with a fake socket;
    `on_close` is called once, when the server closes it."""

    socket = FakeSocket()

    def __init__(self, inner: trio.abc.HalfCloseableStream, on_close: Callable[[], None]) -> None:
        self.inner = inner
        self._on_close: Callable[[], None] | None = on_close

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        if self._on_close is not None:
            self._on_close, on_close = None, self._on_close
            on_close()
        await self.inner.aclose()


@dataclass
class FakeConnection:
    """The Worker's RunnerConnection to a fake runner."""

    stream: trio.abc.Stream
    pid: int | None = None

    async def aclose(self) -> None:
        await self.stream.aclose()


def model_info(context_length: int) -> ModelInfo:
    """What the lone node reports of its model to itself, the leader."""
    return ModelInfo(
        id=MODEL,
        size_bytes=64 << 20,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        supports_tensor=True,
        context_length=context_length,
    )


def expected_text(request_id: str, chunks: int) -> str:
    """What the fake runner streams for a request's first `chunks` tokens."""
    return "".join(fake_text(fake_token(request_id, seq)) for seq in range(chunks))


class NoListener(trio.abc.Listener[trio.abc.Stream]):
    """Where a lone node's links listen: nowhere (nothing ever connects)."""

    async def accept(self) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class ConnectionListener(trio.abc.Listener[trio.abc.Stream]):
    """The API's listener: accepts the server ends `InProcessNode.connect` makes."""

    def __init__(self, receive: trio.MemoryReceiveChannel[trio.abc.Stream]) -> None:
        self.receive = receive

    async def accept(self) -> trio.abc.Stream:
        return await self.receive.receive()

    async def aclose(self) -> None:
        await self.receive.aclose()


@dataclass
class InProcessNode:
    """Build with `start(nursery, ...)`; then `connect()` gives client streams."""

    parts: AssembledNode
    settings: ApiSettings
    step_delay: float
    eos_after: int | None
    max_batch: int
    incoming: trio.MemorySendChannel[trio.abc.Stream]
    runners: list[FakeRunner] = field(default_factory=list)
    runner_scopes: list[trio.CancelScope] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    _nursery: trio.Nursery | None = None
    _idle: trio.Event = field(default_factory=trio.Event)

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        encoder: PromptEncoder,
        *,
        settings: ApiSettings | None = None,
        context_length: int = 256,
        vocab_size: int = 0,
        step_delay: float = 0.0,
        eos_after: int | None = None,
        max_batch: int = 8,
        new_id: Callable[[str], str] | None = None,
    ) -> InProcessNode:
        holder: list[InProcessNode] = []
        seams = Seams(wall_clock=lambda: 1_700_000_000.0)
        if new_id is not None:
            seams.new_id = new_id
        settings = settings or ApiSettings()
        incoming, accepted = trio.open_memory_channel[trio.abc.Stream](math.inf)

        async def listen_api(config: object) -> Sequence[Bound]:
            await trio.lowlevel.checkpoint()
            return [(ConnectionListener(accepted), "http://inproc")]

        async def listen_links(host: str, port: int) -> Sequence[trio.abc.Listener[Any]]:
            await trio.lowlevel.checkpoint()
            return [NoListener()]

        def launcher_for(spec: InstanceSpec, rank: int) -> Launcher:
            return lambda: holder[0]._launch()

        parts = build_node(
            NodeSetup(
                node_id=NODE_ID,
                host="127.0.0.1",
                served=[
                    ServedModel(
                        ModelCard(
                            id=MODEL,
                            context_length=context_length,
                            created=0,
                            vocab_size=vocab_size,
                        ),
                        encoder,
                    )
                ],
                models={MODEL: model_info(context_length)},
                serve=(MODEL,),
                api=settings,
                # Alone: nothing to wait for before placing the model on itself.
                cluster=ClusterSettings(settle=0.0),
                http=hypercorn_config(),
                restart_backoff=0.05,
            ),
            NodeEffects(
                launcher_for=launcher_for,
                seams=seams,
                listen_api=listen_api,
                link_listener=listen_links,
                memory_free=lambda: 16 << 30,
                free_ports=lambda: (61000,),
            ),
        )
        self = cls(parts, settings, step_delay, eos_after, max_batch, incoming)
        holder.append(self)
        self._nursery = nursery
        await nursery.start(parts.run)
        while not parts.node.ready(MODEL):  # placed on itself, its runner ready
            await trio.sleep(0.01)
        self._idle.set()
        return self

    @property
    def node(self) -> Node:
        return self.parts.node

    @property
    def registry(self) -> StreamRegistry:
        return self.parts.registry

    @property
    def worker(self) -> Worker:
        worker = self.node.local_worker()
        assert worker is not None, "the node has no runner"
        return worker

    # ---- runners ----

    async def _launch(self) -> FakeConnection:
        ours, theirs = trio.testing.memory_stream_pair()
        runner = FakeRunner(
            theirs,
            model=MODEL,
            step_delay=lambda: self.step_delay,
            eos_after=self.eos_after,
            context_length=self.node.model.context_length,
            max_batch=self.max_batch,
        )
        scope = trio.CancelScope()
        self.runners.append(runner)
        self.runner_scopes.append(scope)

        async def run() -> None:
            with scope:
                try:
                    await runner.run()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await theirs.aclose()  # a killed runner's pipe ends

        assert self._nursery is not None
        self._nursery.start_soon(run)
        return FakeConnection(ours)

    @property
    def runner(self) -> FakeRunner:
        """The runner started last (the current one)."""
        return self.runners[-1]

    def kill_runner(self) -> None:
        self.runner_scopes[-1].cancel()

    # ---- HTTP ----

    def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """A new HTTP connection to the node's API. With `lockstep` the server's
        writes block until the client reads (a client that stops reading stalls
        them, as a full socket buffer does)."""
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = pair()
        self.connections += 1
        self.open_connections += 1
        self._idle = trio.Event()
        self.incoming.send_nowait(MemoryConnection(server, self._closed))
        return client

    def _closed(self) -> None:
        self.open_connections -= 1
        if self.open_connections == 0:
            self._idle.set()

    async def wait_connections_closed(self) -> None:
        await self._idle.wait()

    # ---- state ----

    @property
    def in_flight(self) -> int:
        value = self.node.metrics.registry.get_sample_value("exo_trio_requests_in_flight")
        return int(value or 0)

    def leftovers(self) -> dict[str, object]:
        """What should be empty once every exchange has ended and the runner acked."""
        left: dict[str, object] = {}
        if len(self.registry):
            left["registry"] = self.registry.open_ids()
        if self.in_flight:
            left["in_flight"] = self.in_flight
        if self.worker.jobs:
            left["worker_jobs"] = sorted(self.worker.jobs)
        if self.runners and self.runner.active:
            left["runner_active"] = sorted(self.runner.active)
        return left

    async def settle(self, limit: float = math.inf) -> dict[str, object]:
        """Wait (up to `limit`) for the connections to close and the runner to drop
        every job; return what is left over (empty when all is clean)."""
        with trio.move_on_after(limit):
            await self.wait_connections_closed()
            while self.leftovers():
                await trio.sleep(0.001)
        return self.leftovers()
