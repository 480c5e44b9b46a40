"""Admission control: a bound on the generation requests a node holds at once.

A node decodes up to its runner's max batch at once; up to `max_queued` more may
wait for a slot. A request beyond that is refused at once (429, or 503 for
Ollama clients) instead of queueing without limit, so a burst shows up as fast
refusals a client can retry, not as ever-growing latency for everyone.

An admitted request holds its slot until its HTTP exchange ends: the response
fully sent, the client gone, or the server stopping. The slot is released by
`ExchangeScope`, an ASGI middleware whose `finally` runs whichever way the
exchange ends; a release tied to the response body alone would leak the slot
when the client disconnects between the handler returning and the body starting.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from exo_trio.api.errors import ApiError
from exo_trio.node import Node

_cleanups: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "exo_trio_exchange_cleanups", default=None
)


class ExchangeScope:
    """ASGI middleware: runs the cleanups registered during an HTTP exchange when
    the exchange ends, however it ends. The whole exchange (handler and response
    body) runs inside this call, in tasks that inherit its context."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        cleanups: list[Callable[[], None]] = []
        token = _cleanups.set(cleanups)
        try:
            await self.app(scope, receive, send)
        finally:
            _cleanups.reset(token)
            for cleanup in reversed(cleanups):
                cleanup()


def at_exchange_end(cleanup: Callable[[], None]) -> None:
    cleanups = _cleanups.get()
    if cleanups is None:
        raise RuntimeError("not inside an HTTP exchange (is ExchangeScope installed?)")
    cleanups.append(cleanup)


class Admission:
    def __init__(self, node: Node, max_queued: int) -> None:
        self.node = node
        self.max_queued = max_queued

    @property
    def in_flight(self) -> int:
        # Kept on the node, which a shutdown's drain waits on (exo_trio/shutdown.py).
        return self.node.exchanges

    @property
    def limit(self) -> int:
        worker = self.node.local_worker()
        info = worker.ready_info if worker is not None else None
        return (info.max_batch if info is not None else 1) + self.max_queued

    def admit(self) -> None:
        """Take a slot for the current HTTP exchange, or refuse with 429."""
        in_flight, limit = self.in_flight, self.limit
        self.node.seams.observer.admission(in_flight < limit, in_flight, limit)
        if in_flight >= limit:
            raise ApiError(
                429,
                f"The server is at capacity ({in_flight} requests in flight, "
                f"limit {limit}). Retry shortly.",
                type="overloaded_error",
                code="server_overloaded",
            )
        self.node.exchanges += 1
        self.node.metrics.in_flight.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.node.exchanges -= 1
                self.node.metrics.in_flight.dec()

        at_exchange_end(release)
