"""Serving the app with hypercorn, with a bound on how long a write may block.

A client that stops reading without closing its connection (a stalled proxy, a
suspended laptop, a hostile peer) would otherwise hold its request forever:
hypercorn writes response bytes with `send_all` inside a *shielded* cancel scope,
so nothing in the app can interrupt a write the kernel cannot take, and the
request's runner slot, channel and admission slot stay taken. What the node
buffers per request is already bounded (the request's channel holds at most
max_tokens + 1 events, and a blocked write stops the relay from reading it); this
module adds the timeout. Each accepted connection is wrapped in a
`BoundedSendStream` whose `send_all` gives up after `send_timeout` seconds: it
closes the socket and raises BrokenResourceError, which hypercorn treats as a
client gone (http.disconnect), so the request's scope is cancelled and its runner
work with it. Other connections never wait on this one.

`serve` is hypercorn's `trio.serve` with that wrapper in the accept path, and with
the listeners as a seam: `tcp_listeners` binds the config's addresses (insecure
TCP sockets only, as the node binds them); the simulator passes listeners of
in-memory connections, so it serves the app through this same code.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from exo_trio.observer import Observer

log = logging.getLogger(__name__)

# Where create_app leaves the send timeout for `serve` (seconds, 0 = off).
SEND_TIMEOUT_KEY = "EXO_TRIO_SEND_TIMEOUT"


class SendTimeout(trio.BrokenResourceError):
    """The client took nothing for `send_timeout` seconds; its connection is closed."""


class BoundedSendStream(trio.abc.HalfCloseableStream):
    """A socket stream whose writes give up after `timeout` seconds (0 = never)."""

    def __init__(
        self, inner: trio.SocketStream, timeout: float, observer: Observer | None = None
    ) -> None:
        self.inner = inner
        self.timeout = timeout
        self.timed_out = False
        self._observer = observer or Observer()

    @property
    def socket(self) -> Any:
        # hypercorn reads the peer and local addresses from here.
        return self.inner.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.timeout <= 0:
            await self.inner.send_all(data)
            return
        # A scope of our own still fires inside hypercorn's shielded one.
        with trio.CancelScope(deadline=trio.current_time() + self.timeout) as scope:
            await self.inner.send_all(data)
        if scope.cancelled_caught:
            self.timed_out = True
            self._observer.send_timed_out(self.inner)
            log.info(
                "closing a connection whose client read nothing for %gs (send timeout)",
                self.timeout,
            )
            await trio.aclose_forcefully(self.inner)
            raise SendTimeout(f"client read nothing for {self.timeout:g}s")

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class BoundedListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(
        self, inner: trio.abc.Listener[Any], timeout: float, observer: Observer | None = None
    ) -> None:
        self.inner = inner
        self.timeout = timeout
        self.observer = observer

    async def accept(self) -> trio.abc.Stream:
        return BoundedSendStream(await self.inner.accept(), self.timeout, self.observer)

    async def aclose(self) -> None:
        await self.inner.aclose()


# A listener and the URL it serves.
Bound = tuple[trio.abc.Listener[Any], str]
Listen = Callable[[Config], Awaitable[Sequence[Bound]]]


async def tcp_listeners(config: Config) -> list[Bound]:
    """Listen on `config.bind` (insecure TCP sockets)."""
    bound = []
    for sock in config.create_sockets().insecure_sockets:
        sock.listen(config.backlog)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        bound.append((listener, f"http://{repr_socket_addr(sock.family, sock.getsockname())}"))
    await trio.lowlevel.checkpoint()
    return bound


async def serve(
    app: Any,
    config: Config,
    *,
    listen: Listen = tcp_listeners,
    send_timeout: float | None = None,
    observer: Observer | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on the listeners `listen` gives until cancelled; reports their
    URLs through task_status. `send_timeout` defaults to what create_app put in the
    app's config."""
    if send_timeout is None:
        send_timeout = float(getattr(app, "config", {}).get(SEND_TIMEOUT_KEY, 0.0))
    asgi = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            bound = await listen(config)
            listeners = [BoundedListener(listener, send_timeout, observer) for listener, _ in bound]
            handler = partial(
                TCPServer, asgi, config, context, ConnectionState(lifespan_state.copy())
            )
            task_status.started([url for _, url in bound])
            try:
                await trio.serve_listeners(handler, listeners, handler_nursery=server_nursery)
            finally:
                # As hypercorn does: let open requests end within the grace time.
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        lifespan_nursery.cancel_scope.cancel()
