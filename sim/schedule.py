"""Schedule control: every batch of runnable Trio tasks is ordered by the choice list.

Trio runs each batch of runnable tasks in an order that `trio._core._run._r.shuffle`
decides when `trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING` is set (after sorting
the batch by task creation order, so the batch's incoming order, which can depend
on set iteration and memory addresses, never matters). Installing a `random.Random`
subclass there gives the simulator every scheduling decision:

- `native`: each batch is permuted by draws (all zeros = oldest task first).
- `pct`: one task runs per scheduler pass, the runnable task with the highest
  priority (PCT, Burckhardt et al. 2010): each task gets a random priority when
  first seen, and at a few drawn change points the running task drops below all
  others. The other tasks of the batch go back on the run queue untouched.

These are private Trio names, so the Trio minor version is pinned (pyproject.toml)
and `self_test()` checks at start-up that the hook is live: an upgrade that moves
them fails loudly instead of silently losing control of the schedule.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, MutableSequence
from contextlib import contextmanager
from typing import Any, Literal

import trio
import trio._core._run as trio_run
import trio.testing

from sim.choices import Choices

Policy = Literal["native", "pct"]
POLICIES: tuple[Policy, ...] = ("native", "pct")

# The Trio minor version whose private scheduling hook this module drives.
TRIO_MINOR = "0.35"

# PCT: how many priority change points per run, spread over this many steps.
PCT_DEPTH = 3
PCT_HORIZON = 20000
# A task that keeps being chosen while others wait is demoted after this many
# consecutive steps, so a checkpoint loop cannot starve the tasks it waits for.
PCT_STARVATION = 64


class ScheduleHookBroken(RuntimeError):
    """Trio's private scheduling hook is not where this simulator expects it."""


class ScheduleRandom(random.Random):
    """Stands in for `trio._core._run._r`: every call draws from the choice list."""

    def __init__(self, choices: Choices, policy: Policy = "native") -> None:
        super().__init__(0)
        self.choices = choices
        self.policy = policy
        self.batches = 0
        self.decisions = 0
        self._priority: dict[object, int] = {}
        self._step = 0
        self._next_low = -1
        self._last: object = None
        self._streak = 0
        self._change_points: set[int] = set()
        if policy == "pct":
            self._change_points = {choices.draw(PCT_HORIZON) for _ in range(PCT_DEPTH)}

    # Anything else in Trio that asks _r for randomness also draws from the list.
    def random(self) -> float:
        return self.choices.draw(1 << 30) / (1 << 30)

    def getrandbits(self, k: int) -> int:
        return self.choices.draw(1 << min(k, 30))

    def shuffle(self, x: MutableSequence[Any]) -> None:  # type: ignore[override]
        self.batches += 1
        if self.policy == "pct":
            self._pct(x)
        else:
            self._permute(x)

    def _permute(self, batch: MutableSequence[Any]) -> None:
        n = len(batch)
        if n < 2:
            return
        self.decisions += n - 1
        if n == 2:  # the common case, without the lists
            if self.choices.draw(2) == 0:  # the older task first: Trio pops from the end
                batch[0], batch[1] = batch[1], batch[0]
            return
        pending = list(batch)  # creation order
        order = []
        draw = self.choices.draw
        while len(pending) > 1:
            order.append(pending.pop(draw(len(pending))))
        order.append(pending[0])
        order.reverse()  # Trio pops tasks from the end of the batch
        batch[:] = order

    def _pct(self, batch: MutableSequence[Any]) -> None:
        if not batch:
            return
        priority = self._priority
        draw = self.choices.draw
        for task in batch:
            if task not in priority:
                priority[task] = 1000 + draw(1 << 20)
        # Highest priority first; creation order breaks ties.
        chosen = max(batch, key=lambda t: (priority[t], -t._counter))
        if len(batch) > 1:
            self.decisions += 1
            self._streak = self._streak + 1 if chosen is self._last else 0
            if self._step in self._change_points or self._streak >= PCT_STARVATION:
                priority[chosen] = self._next_low
                self._next_low -= 1
                self._streak = 0
            runner = trio_run.GLOBAL_RUN_CONTEXT.runner
            runner.runq.extend(t for t in batch if t is not chosen)
        self._step += 1
        self._last = chosen
        batch[:] = [chosen]


def check_trio_version() -> None:
    version = trio.__version__
    if not (version == TRIO_MINOR or version.startswith(TRIO_MINOR + ".")):
        raise ScheduleHookBroken(
            f"the simulator drives Trio {TRIO_MINOR}.x private scheduling hooks; "
            f"found Trio {version}: re-check sim/schedule.py against the new "
            "trio/_core/_run.py and update TRIO_MINOR and the pin in pyproject.toml"
        )
    if not hasattr(trio_run, "_r") or not hasattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING"):
        raise ScheduleHookBroken("trio._core._run has no _r / _ALLOW_DETERMINISTIC_SCHEDULING")


@contextmanager
def controlled(hook: ScheduleRandom) -> Iterator[ScheduleRandom]:
    """Install the hook for the duration of one `trio.run`; restore Trio's own after."""
    saved = trio_run._r, trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    trio_run._r = hook
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    try:
        yield hook
    finally:
        trio_run._r, trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved  # type: ignore[misc]


class _QuietIO:
    """Marks the I/O manager class `quiet_io` installs."""


def _quiet_io_manager(base: type) -> type:
    class QuietIOManager(base, _QuietIO):  # type: ignore[misc, valid-type]
        """Skips the I/O poll while it could only report nothing.

        Trio polls its I/O manager once per batch of tasks (epoll_wait with a zero
        timeout under the autojumping clock): a system call that was a tenth of a
        seed's time. A simulated world has no file descriptors of its own (every
        stream is in memory); the one registered descriptor is the wake-up socket
        of Trio's entry queue (`run_sync_soon`: async generator finalizers, other
        threads, signal handlers). The poll is skipped while that is all and the
        entry queue holds no job, so the skipped polls would have found nothing to
        run and the schedule is unchanged. Every QUIET_POLL_EVERY batches it polls
        anyway, to drain the bytes a signal leaves on the socket."""

        _skipped = 0
        _entry_fd = -1

        def get_events(self, timeout: float) -> Any:
            if timeout <= 0 and self._skipped < QUIET_POLL_EVERY and self._nothing_to_report():
                self._skipped += 1
                return []
            self._skipped = 0
            return super().get_events(timeout)

        def _nothing_to_report(self) -> bool:
            registered = self._registered
            if len(registered) > 1:
                return False
            entry = trio_run.GLOBAL_RUN_CONTEXT.runner.entry_queue
            if entry.queue or entry.idempotent_queue:
                return False
            if not registered:
                return True
            if self._entry_fd < 0:
                self._entry_fd = entry.wakeup.wakeup_sock.fileno()
            return self._entry_fd in registered

    return QuietIOManager


QUIET_POLL_EVERY = 256


@contextmanager
def quiet_io() -> Iterator[None]:
    """Install the quiet I/O manager for the `trio.run` calls inside (skipped where
    Trio's I/O manager is not the selector kind this knows, e.g. on Windows)."""
    saved = trio_run.TheIOManager
    fields = [a.name for a in getattr(saved, "__attrs_attrs__", ())]
    known = hasattr(saved, "get_events") and "_registered" in fields
    if known:
        trio_run.TheIOManager = _quiet_io_manager(saved)  # type: ignore[misc]
    try:
        yield
    finally:
        trio_run.TheIOManager = saved  # type: ignore[misc]


def _probe_order(replay: list[int], policy: Policy) -> tuple[list[int], ScheduleRandom]:
    order: list[int] = []

    async def one(i: int) -> None:
        await trio.lowlevel.checkpoint()
        order.append(i)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)

    hook = ScheduleRandom(Choices(replay=replay), policy)
    with controlled(hook):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return order, hook


_self_tested = False


def self_test() -> None:
    """Fail loudly unless the pinned Trio consults our hook for every batch, and
    the orders it produces are exactly the ones the choices say."""
    global _self_tested
    if _self_tested:
        return
    check_trio_version()
    for policy in POLICIES:
        zeros, hook = _probe_order([], policy)
        if hook.batches == 0:
            raise ScheduleHookBroken(f"Trio never called the scheduling hook ({policy})")
        reversed_order, _ = _probe_order([3, 2, 1] * 1000, policy)
        if policy == "native" and zeros != [0, 1, 2, 3]:
            raise ScheduleHookBroken(f"all-zero choices gave order {zeros}, not creation order")
        if sorted(reversed_order) != [0, 1, 2, 3] or reversed_order == zeros:
            raise ScheduleHookBroken(
                f"the choices do not control the order ({policy}): {zeros} vs {reversed_order}"
            )
    if not isinstance(trio_run._r, random.Random) or isinstance(trio_run._r, ScheduleRandom):
        raise ScheduleHookBroken("Trio's own _r was not restored after the self-test")
    _self_tested = True
