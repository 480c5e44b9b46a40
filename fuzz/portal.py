"""A Trio event loop in a thread of its own, for synchronous fuzz drivers.

libFuzzer (atheris) and hypothesis both call a plain function once per input. The
API and link targets need a long-lived Trio world (a node, its runner, its app),
so it runs in a background thread and each input is handed over with
`trio.from_thread.run`; exceptions come back to the caller.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class Portal:
    """`Portal(setup)` runs `await setup(nursery)` in a new Trio loop; its result is
    `portal.world`. `call(fn, *args)` runs `await fn(*args)` there; `close()` ends it."""

    def __init__(self, setup: Callable[[trio.Nursery], Awaitable[Any]]) -> None:
        self._setup = setup
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.world: Any = None
        self._thread = threading.Thread(target=self._run, name="fuzz-trio", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.world = await self._setup(nursery)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)
