"""Running many seeds: in this process or across worker processes, with coverage.

A sweep fails if any seed violates an invariant, or if (given enough seeds) one of
the key situations never happened: a sweep that never let a chunk arrive before
its reader, never cut a stream mid-way and never crashed a runner mid-stream has
proved nothing, however green it is.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from sim import coverage
from sim.choices import Choices
from sim.mutants import MUTANTS
from sim.run import RunResult, run_choices
from sim.scenario import DEFAULT, Scenario, scenario_for
from sim.schedule import Policy

# Situations every sweep of at least MIN_COVERAGE_SEEDS seeds must have produced.
KEY_COVERAGE = (
    "chunk_before_client_read",  # the runner emitted before the client read a byte
    "chunk_before_consumer_read",  # a chunk reached its channel before anyone waited on it
    "disconnect_mid_stream",
    "runner_crash_mid_stream",
    # The production fault points the simulator widens races at: a refactor that
    # drops one silently closes the window (exo's bug lived behind the first).
    "fault_point_after_dispatch",
    "fault_point_before_first_write",
    # Between nodes: a request relayed through the TokenRelay and PeerLinks, and a
    # link cut, a node crash and a leader change while requests were streaming.
    "request_relayed",
    "link_cut_mid_stream",
    "node_crash_mid_stream",
    "leader_change_mid_stream",
    # With the runners modelling the engine's starts: a prompt cache hit, and a
    # step that started several requests together.
    "prompt_cache_hit",
    "burst_start",
)


def key_coverage(scenario: Scenario) -> tuple[str, ...]:
    """The key situations this scenario can produce."""
    skip = set()
    if not scenario.runner_crashes:
        skip.add("runner_crash_mid_stream")
    if scenario.nodes < 2:
        skip |= {
            "request_relayed",
            "link_cut_mid_stream",
            "node_crash_mid_stream",
            "leader_change_mid_stream",
        }
    if not {"reset", "partition"} & set(scenario.fault_kinds):
        skip.add("link_cut_mid_stream")
    if "crash" not in scenario.fault_kinds:
        skip.add("node_crash_mid_stream")
    if not scenario.prompt_cache_tokens:
        skip |= {"prompt_cache_hit", "burst_start"}
    return tuple(k for k in KEY_COVERAGE if k not in skip)


MIN_COVERAGE_SEEDS = 50
CHUNK = 10


@dataclass
class SeedOutcome:
    seed: int
    digest: str
    violations: list[str]
    kinds: list[str]
    coverage: dict[str, int]
    elapsed: float
    cpu: float
    errors: dict[str, int] = field(default_factory=dict)
    explained: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class SweepReport:
    seeds: int = 0
    failures: list[SeedOutcome] = field(default_factory=list)
    coverage: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    cpu: float = 0.0  # summed per-seed CPU time (what the cores spent, without waits)
    missing_coverage: list[str] = field(default_factory=list)
    # Per counter of the catalogue: after how many seeds (in seed order) and how much
    # CPU time it was first non-zero; and when every counter was (None: never).
    first_seen: dict[str, tuple[int, float]] = field(default_factory=dict)
    full_coverage: tuple[int, float] | None = None
    errors: Counter[str] = field(default_factory=Counter)  # errors clients got, by kind
    explained: Counter[str] = field(default_factory=Counter)  # ...and what explained them

    @property
    def seeds_per_s(self) -> float:
        return self.seeds / self.wall if self.wall else 0.0

    @property
    def seeds_per_s_per_core(self) -> float:
        return self.seeds / self.cpu if self.cpu else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing_coverage


def mutant_context(name: str | None) -> AbstractContextManager[None]:
    return MUTANTS[name].apply() if name else nullcontext()


def run_one(
    seed: int,
    policy: Policy = "native",
    mutant: str | None = None,
    nodes: int | None = None,
    scenario: str | None = None,
) -> RunResult:
    """One seed. Without a scenario, a mutant's own (the one that provokes it) or
    the default."""
    if scenario is None:
        scenario = (MUTANTS[mutant].scenario if mutant else None) or DEFAULT.name
    with mutant_context(mutant):
        return run_choices(
            Choices(seed=seed), policy=policy, seed=seed, nodes=nodes, scenario=scenario
        )


def outcome(result: RunResult) -> SeedOutcome:
    assert result.seed is not None
    return SeedOutcome(
        seed=result.seed,
        digest=result.digest,
        violations=[str(v) for v in result.violations],
        kinds=sorted(result.kinds),
        coverage=dict(result.coverage),
        elapsed=result.elapsed,
        cpu=result.cpu,
        errors=dict(result.errors),
        explained=dict(result.explained),
    )


Where = tuple[int | None, str | None]  # (nodes, scenario name): None for the default


def _run_chunk(args: tuple[list[int], Policy, str | None, Where]) -> list[SeedOutcome]:
    seeds, policy, mutant, (nodes, scenario) = args
    return [outcome(run_one(seed, policy, mutant, nodes, scenario)) for seed in seeds]


def outcomes(
    seeds: Iterable[int],
    policy: Policy,
    mutant: str | None,
    jobs: int,
    where: Where = (None, None),
) -> Iterator[SeedOutcome]:
    seeds = list(seeds)
    if jobs <= 1:
        for seed in seeds:
            yield outcome(run_one(seed, policy, mutant, *where))
        return
    chunks = [(seeds[i : i + CHUNK], policy, mutant, where) for i in range(0, len(seeds), CHUNK)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for batch in pool.imap_unordered(_run_chunk, chunks):
            yield from batch


def sweep(
    seeds: Iterable[int],
    *,
    policy: Policy = "native",
    mutant: str | None = None,
    jobs: int = 1,
    on_outcome: Callable[[SeedOutcome], None] | None = None,
    nodes: int | None = None,
    scenario: str | None = None,
) -> SweepReport:
    report = SweepReport()
    started = time.perf_counter()
    chosen = scenario_for(nodes, scenario or DEFAULT.name)
    done: list[SeedOutcome] = []
    for result in outcomes(seeds, policy, mutant, jobs, (nodes, scenario)):
        report.seeds += 1
        report.cpu += result.cpu
        report.coverage.update(result.coverage)
        report.errors.update(result.errors)
        report.explained.update(result.explained)
        done.append(result)
        if not result.ok:
            report.failures.append(result)
        if on_outcome is not None:
            on_outcome(result)
    report.wall = time.perf_counter() - started
    report.failures.sort(key=lambda o: o.seed)
    report.first_seen, report.full_coverage = first_seen(done, coverage.required(chosen))
    if mutant is None:
        if report.seeds >= MIN_COVERAGE_SEEDS:
            keys = key_coverage(chosen)
            report.missing_coverage = [k for k in keys if not report.coverage.get(k)]
        if report.seeds >= coverage.MIN_SEEDS:
            for name in coverage.missing(chosen, report.coverage):
                if name not in report.missing_coverage:
                    report.missing_coverage.append(name)
    return report


def first_seen(
    done: list[SeedOutcome], names: list[str]
) -> tuple[dict[str, tuple[int, float]], tuple[int, float] | None]:
    """In seed order: after how many seeds, and how much CPU time, each counter was
    first non-zero; and when all of them were."""
    seen: dict[str, tuple[int, float]] = {}
    cpu = 0.0
    for count, outcome in enumerate(sorted(done, key=lambda o: o.seed), start=1):
        cpu += outcome.cpu
        for name in names:
            if name not in seen and outcome.coverage.get(name):
                seen[name] = (count, cpu)
    full = max(seen.values()) if len(seen) == len(names) and names else None
    return seen, full


@dataclass
class MutantReport:
    name: str
    bug: str
    caught: bool
    seeds_to_catch: int  # runs, when explored
    seed: int | None
    violation: str | None
    explored_cpu: float | None = None  # CPU seconds of exploration (explored mutants)
    choices: list[int] | None = None  # the catching run's list (explored mutants)


# CPU seconds of guided exploration a mutant only exploration reaches may take.
EXPLORE_SECONDS = 60.0


def _hunt(args: tuple[str, int, int, Policy, Where]) -> MutantReport:
    name, start, limit, policy, (nodes, scenario) = args
    mutant = MUTANTS[name]
    if mutant.explore:
        return _explore_hunt(name, start, policy, nodes, scenario)
    for i in range(limit):
        seed = start + i
        result = run_one(seed, policy, name, nodes, scenario)
        if result.violations:
            return MutantReport(name, mutant.bug, True, i + 1, seed, str(result.violations[0]))
    return MutantReport(name, mutant.bug, False, limit, None, None)


def _explore_hunt(
    name: str, start: int, policy: Policy, nodes: int | None, scenario: str | None
) -> MutantReport:
    from sim.explore import explore
    from sim.run import can_cancel, default_dialects

    mutant = MUTANTS[name]
    chosen = scenario_for(nodes, scenario or mutant.scenario or DEFAULT.name)
    with mutant_context(name):
        state = explore(
            EXPLORE_SECONDS,
            scenario=chosen,
            dialects=default_dialects(),
            can_cancel=can_cancel(),
            policy=policy,
            start=start,
            stop_at_failure=True,
        )
    found = state.failure
    return MutantReport(
        name,
        mutant.bug,
        found is not None,
        state.runs,
        None,
        str(found.violations[0]) if found is not None else None,
        explored_cpu=state.cpu,
        choices=list(found.choices) if found is not None else None,
    )


def hunt_mutants(
    names: list[str],
    *,
    start: int,
    limit: int,
    policy: Policy,
    jobs: int,
    nodes: int | None = None,
    scenario: str | None = None,
) -> list[MutantReport]:
    tasks = [(name, start, limit, policy, (nodes, scenario)) for name in names]
    if jobs <= 1:
        return [_hunt(t) for t in tasks]
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        return pool.map(_hunt, tasks)
