"""Known bugs, patched into the real code at run time, that the simulator must catch.

Each mutant monkeypatches production classes for the duration of a `with` block
and restores them after. `python -m sim --mutants` runs each against the sweep's
seeds until the invariants fail, and reports how many seeds that took.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from exo_trio.node import Node
from exo_trio.streams import RequestStream, StreamRegistry
from exo_trio.types import ChunkGenerated, GenerationEvent, GenerationFinished
from exo_trio.worker import Worker


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    apply: Callable[[], AbstractContextManager[None]]


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# ---- register after dispatch (exo's bug) ----


class _LateStream:
    """The request's channel, registered only when the response body first reads
    from it: whatever the runner sent before that went to an unknown id."""

    def __init__(self, register: Callable[[], RequestStream]) -> None:
        self._register = register
        self._stream: RequestStream | None = None

    @property
    def finished(self) -> bool:
        return self._stream is not None and self._stream.finished

    async def receive(self) -> GenerationEvent:
        if self._stream is None:
            self._stream = self._register()
        return await self._stream.receive()

    def __aiter__(self) -> _LateStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self.finished:
            raise StopAsyncIteration
        return await self.receive()


def register_after_dispatch() -> AbstractContextManager[None]:
    """`registry.open` hands back a placeholder; the real registration happens on
    the first read, after Node.open_generation has dispatched (exo's order)."""
    real = StreamRegistry.open

    def open_(self: StreamRegistry, request_id: str, max_tokens: int) -> _LateStream:
        return _LateStream(lambda: real(self, request_id, max_tokens))

    return patched(StreamRegistry, "open", open_)


# ---- a missing unregister ----


def missing_unregister() -> AbstractContextManager[None]:
    def close(self: StreamRegistry, request_id: str) -> None:
        return None

    return patched(StreamRegistry, "close", close)


# ---- cancellation that never reaches the runner ----


def cancel_not_sent() -> AbstractContextManager[None]:
    def cancel(self: Worker, request_id: str) -> None:
        job = self.jobs.get(request_id)
        if job is not None:
            job.cancelled = True  # remembered, never sent

    return patched(Worker, "cancel", cancel)


# ---- a dropped terminal event ----


def dropped_terminal() -> AbstractContextManager[None]:
    real = Worker._handle

    def handle(self: Worker, message: Any) -> bool:
        if isinstance(message, GenerationFinished) and message.completion_tokens % 2:
            self.jobs.pop(message.request_id, None)  # the job ends, the event is lost
            return False
        return real(self, message)

    return patched(Worker, "_handle", handle)


# ---- a reused sequence number ----


def reused_seq() -> AbstractContextManager[None]:
    real = Worker._handle

    def handle(self: Worker, message: Any) -> bool:
        if isinstance(message, ChunkGenerated) and message.seq == 3:
            message = ChunkGenerated(
                request_id=message.request_id, seq=2, token=message.token, text=message.text
            )
        return real(self, message)

    return patched(Worker, "_handle", handle)


# ---- beyond the list ----


def small_channel() -> AbstractContextManager[None]:
    """The per-request buffer sized for a few events, not max_tokens + 1: a slow
    reader overflows it."""
    real = StreamRegistry.open

    def open_(self: StreamRegistry, request_id: str, max_tokens: int) -> RequestStream:
        return real(self, request_id, min(max_tokens, 4))

    return patched(StreamRegistry, "open", open_)


def cancel_endpoint_forgets_runner() -> AbstractContextManager[None]:
    """POST /v1/cancel ends the client's stream but never tells the runner."""
    real = Node.cancel_request

    def cancel_request(self: Node, request_id: str) -> bool:
        dispatcher: Any = self.dispatcher
        dispatcher.cancel = lambda *args: None  # shadows the method for this call
        try:
            return real(self, request_id)
        finally:
            del dispatcher.cancel

    return patched(Node, "cancel_request", cancel_request)


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        Mutant(
            "register_after_dispatch",
            "the channel is registered when the body is first read, after dispatch (exo)",
            register_after_dispatch,
        ),
        Mutant("missing_unregister", "a closed request is never unregistered", missing_unregister),
        Mutant(
            "cancel_not_sent",
            "cancellation is recorded but never reaches the runner",
            cancel_not_sent,
        ),
        Mutant(
            "dropped_terminal",
            "the worker drops some GenerationFinished events",
            dropped_terminal,
        ),
        Mutant("reused_seq", "the relay reuses a chunk's sequence number", reused_seq),
        Mutant(
            "small_channel", "the request channel holds 4 events, not max_tokens + 1", small_channel
        ),
        Mutant(
            "cancel_endpoint_forgets_runner",
            "POST /v1/cancel ends the stream but leaves the runner generating",
            cancel_endpoint_forgets_runner,
        ),
    )
}
