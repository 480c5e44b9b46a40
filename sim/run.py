"""One simulated run: a choice list in, a digest, coverage and violations out.

Everything happens inside one `trio.run` under `MockClock(autojump_threshold=0)`
with the schedule hook installed, cyclic GC paused (so no finalizer runs at a
moment that depends on the heap) and the loggers captured (an error logged by
the production code is an unexpected exception).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

import trio
import trio.testing
import trio.to_thread

from sim import speedups
from sim.choices import Choices
from sim.coverage import collect
from sim.dialects import DIALECTS, available
from sim.invariants import Violation, check
from sim.scenario import DEFAULT, Scenario, draw_plan, scenario_for
from sim.schedule import Policy, ScheduleRandom, controlled, quiet_io, self_test
from sim.trace import Trace
from sim.world import World

CANCEL_PREFIX = "/v1/cancel"
# A run takes tens of milliseconds; one still going after this is stuck.
REAL_TIME_LIMIT = 30.0


@dataclass
class RunResult:
    digest: str
    violations: list[Violation]
    coverage: Counter[str]
    choices: list[int]
    dialects: list[str]
    policy: Policy
    elapsed: float
    cpu: float
    seed: int | None = None
    lines: list[str] | None = field(default=None, repr=False)
    nodes: int = DEFAULT.nodes
    scenario: str = DEFAULT.name
    errors: Counter[str] = field(default_factory=Counter)
    explained: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def kinds(self) -> set[str]:
        return {v.kind for v in self.violations}


@cache
def served_routes(method: str | None = None) -> tuple[str, ...]:
    """The app's routes, from a throwaway node (the set grows as dialects land)."""
    plan = draw_plan(Choices(replay=[]), scenario_for(1), ["openai_chat"], False)
    return tuple(World(plan, Choices(replay=[]), Trace()).nodes[0].routes(method))


def default_dialects() -> list[str]:
    return [d.name for d in available(served_routes())]


def can_cancel() -> bool:
    return any(route.startswith(CANCEL_PREFIX) for route in served_routes())


def virtual_clock() -> trio.testing.MockClock:
    """MockClock(autojump_threshold=0): time moves only when every task is blocked,
    straight to the next deadline. At rate 0 a reading ignores the real clock, so
    the read is skipped (the run loop asks for the time thousands of times a run;
    MockClock is final, hence an instance attribute rather than a subclass)."""
    clock = trio.testing.MockClock(rate=0, autojump_threshold=0)
    clock.current_time = lambda: clock._virtual_base  # type: ignore[method-assign]
    return clock


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f" ({type(exc).__name__}: {exc})"
        self.lines.append(line)


@contextmanager
def captured_errors() -> Iterator[list[str]]:
    root = logging.getLogger()
    handler = _Capture()
    saved = root.level, root.handlers[:]
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        yield handler.lines
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


class RealTimeout(Exception):
    """A run took too long in real time: it is stuck where virtual time cannot
    move (every task blocked with no deadline left, e.g. during teardown)."""


@contextmanager
def real_time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds` of real time (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise RealTimeout(f"the run was still going after {seconds:.0f}s of real time")

    saved = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)


class ThreadOnSimulatedPath(RuntimeError):
    """Something on the simulated path asked for a thread: virtual time cannot see
    it and the schedule cannot order it."""


@contextmanager
def no_threads(uses: list[str]) -> Iterator[None]:
    """Refuse `trio.to_thread.run_sync` for the run (quart runs sync handlers in
    threads; none may be on the simulated path), recording who asked."""
    real = trio.to_thread.run_sync

    async def refuse(fn: object, *args: object, **kwargs: object) -> object:
        uses.append(repr(fn)[:120])
        raise ThreadOnSimulatedPath(f"trio.to_thread.run_sync({fn!r})")

    trio.to_thread.run_sync = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        trio.to_thread.run_sync = real


_runs_since_full_collect = 0


@contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection during a run; afterwards, collect what it left.

    A run allocates a few hundred thousand short-lived objects (tasks, cancel
    scopes, frames), and automatic collections kept scanning the whole heap
    (modules, the app's routes) while it did: about a quarter of a seed's time.
    Once the run's world is unreferenced its garbage is all in generation 0, so
    collecting that generation frees it for a fraction of the cost; a full
    collection every 100 runs catches the rare cycle that reaches older objects."""
    global _runs_since_full_collect
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            _runs_since_full_collect += 1
            if _runs_since_full_collect >= 100:
                _runs_since_full_collect = 0
                gc.collect()
            else:
                gc.collect(0)
            gc.enable()


@gc_paused()  # collects once the run returned: its world is garbage then
def run_choices(
    choices: Choices,
    *,
    scenario: Scenario | str = DEFAULT,
    policy: Policy = "native",
    dialects: Sequence[str] | None = None,
    keep_lines: bool = False,
    seed: int | None = None,
    nodes: int | None = None,
) -> RunResult:
    scenario = scenario_for(nodes, scenario)
    self_test()
    speedups.apply()
    started, cpu_started = time.perf_counter(), time.process_time()
    names = list(dialects) if dialects is not None else default_dialects()
    unknown = [name for name in names if name not in DIALECTS]
    if unknown or not names:
        raise ValueError(f"unknown dialects {unknown} (known: {sorted(DIALECTS)})")
    trace = Trace(keep_lines)
    plan = draw_plan(choices, scenario, names, can_cancel())
    hook = ScheduleRandom(choices, policy)
    crash: str | None = None
    limit = real_time_limit(REAL_TIME_LIMIT)
    threads: list[str] = []
    world = World(plan, choices, trace)
    with captured_errors() as errors, controlled(hook), quiet_io(), limit, no_threads(threads):
        try:
            trio.run(world.main, clock=virtual_clock())
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            crash = "".join(traceback.format_exception(exc)).strip()
    violations = check(world, crash, errors, threads)
    collect(world)
    coverage = world.coverage
    for name, n in world.faults.delays.items():
        coverage[f"fault_delay_{name}"] += n
    for name, n in world.faults.hits.items():
        coverage[f"fault_point_{name}"] += n
    for result in world.results:
        coverage[f"ending_{result.ending}"] += 1
        jobs = world.ledger.by_client.get(result.plan.index)
        first_emit = jobs[0].first_emit_tick if jobs else None
        if first_emit is not None and (
            result.first_byte_tick is None or first_emit < result.first_byte_tick
        ):
            coverage["chunk_before_client_read"] += 1
        if result.cancel_sent_at is not None:
            coverage[f"cancel_status_{result.cancel_status}"] += 1
        if result.keepalives:
            coverage["keepalive_received"] += 1
        if result.status is not None and result.status != 200:
            coverage[f"status_{result.status}"] += 1
    return RunResult(
        digest=trace.digest(),
        violations=violations,
        coverage=coverage,
        choices=choices.record,
        dialects=names,
        policy=policy,
        elapsed=time.perf_counter() - started,
        cpu=time.process_time() - cpu_started,
        seed=seed,
        lines=trace.lines,
        nodes=scenario.nodes,
        scenario=scenario.name,
        errors=world.error_kinds,
        explained=world.explained,
    )


def run_seed(seed: int, **kwargs: object) -> RunResult:
    return run_choices(Choices(seed=seed), seed=seed, **kwargs)  # type: ignore[arg-type]
