"""A whole node in this process: the production app on hypercorn over memory streams.

The API fuzz targets and the timeout tests drive the real request path (h11 in
hypercorn, the ExchangeScope middleware, quart-trio, the dialect adapters, the
shared lifecycle, the streams registry, the Worker and the framed runner
protocol) with only two things swapped: HTTP connections are in-memory streams
(no sockets, so it runs under MockClock too) and the runner is `sim.fake_runner`,
which speaks the real protocol and emits a deterministic token per (request, seq).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from exo_trio.api.app import ApiSettings, create_app
from exo_trio.api.serving import BoundedSendStream
from exo_trio.node import ModelCard, Node
from exo_trio.prompts import PromptEncoder
from exo_trio.seams import Seams
from exo_trio.streams import StreamRegistry
from exo_trio.worker import Worker
from sim.fake_runner import FakeRunner, fake_text, fake_token
from sim.world import hypercorn_config

MODEL = "demo"


class FakeSocket:
    """What hypercorn asks a connection's socket: its family and both addresses."""

    family = socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 40000)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 52415)


class MemoryConnection(trio.abc.HalfCloseableStream):
    """The server's end of an in-memory HTTP connection, with a fake socket."""

    socket = FakeSocket()

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class FakeConnection:
    """The Worker's RunnerConnection to a fake runner."""

    stream: trio.abc.Stream
    pid: int | None = None

    async def aclose(self) -> None:
        await self.stream.aclose()


def expected_text(request_id: str, chunks: int) -> str:
    """What the fake runner streams for a request's first `chunks` tokens."""
    return "".join(fake_text(fake_token(request_id, seq)) for seq in range(chunks))


@dataclass
class InProcessNode:
    """Build with `start(nursery, ...)`; then `connect()` gives client streams."""

    node: Node
    worker: Worker
    registry: StreamRegistry
    settings: ApiSettings
    step_delay: float
    eos_after: int | None
    max_batch: int
    runners: list[FakeRunner] = field(default_factory=list)
    runner_scopes: list[trio.CancelScope] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    _nursery: trio.Nursery | None = None
    _asgi: Any = None
    _config: HypercornConfig = field(default_factory=hypercorn_config)
    _lifespan_state: dict[str, Any] = field(default_factory=dict)
    _context: WorkerContext = field(default_factory=lambda: WorkerContext(None))
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
        registry = StreamRegistry()
        holder: list[InProcessNode] = []
        worker = Worker(
            lambda: holder[0]._launch(), registry.deliver, restart_backoff=0.05, max_backoff=0.2
        )
        seams = Seams(wall_clock=lambda: 1_700_000_000.0)
        if new_id is not None:
            seams.new_id = new_id
        node = Node(
            model=ModelCard(
                id=MODEL, context_length=context_length, created=0, vocab_size=vocab_size
            ),
            encoder=encoder,
            worker=worker,
            registry=registry,
            seams=seams,
        )
        settings = settings or ApiSettings()
        self = cls(node, worker, registry, settings, step_delay, eos_after, max_batch)
        holder.append(self)
        self._nursery = nursery
        app = create_app(node, settings)
        self._asgi = wrap_app(app, self._config.wsgi_max_body_size, None)
        lifespan = Lifespan(self._asgi, self._config, self._lifespan_state)
        await nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        nursery.start_soon(worker.run)
        await worker.wait_ready()
        self._idle.set()
        return self

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

    def connect(self, *, lockstep: bool = False, send_timeout: float = 0.0) -> trio.abc.Stream:
        """A new HTTP connection; hypercorn serves the other end. With `lockstep`
        the server's writes block until the client reads (a client that stops
        reading stalls them, as a full socket buffer does)."""
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = pair()
        server_end: trio.abc.Stream = MemoryConnection(server)
        if send_timeout > 0:
            server_end = BoundedSendStream(server_end, send_timeout)  # type: ignore[arg-type]
        tcp = TCPServer(
            self._asgi,
            self._config,
            self._context,
            ConnectionState(self._lifespan_state.copy()),
            server_end,  # type: ignore[arg-type]
        )
        self.connections += 1
        self.open_connections += 1
        self._idle = trio.Event()

        async def serve() -> None:
            try:
                await tcp.run()
            finally:
                self.open_connections -= 1
                if self.open_connections == 0:
                    self._idle.set()

        assert self._nursery is not None
        self._nursery.start_soon(serve)
        return client

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
