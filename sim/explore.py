"""Guided exploration: keep the choice lists that reached new coverage, and mutate
and extend them, as coverage-guided fuzzers do, instead of only drawing fresh seeds.

A run is a choice list (sim/choices.py): its head is the plan (which features the
swarm enables, the workload, the faults), its tail the schedule and every fault
decision. A list that reached a counter, or a counter's count bucket (1, 2, 3,
4-7, 8-15, ...), no run had reached before joins the corpus. Each next run is a
corpus entry, chosen with a weight for the rarity of what it reached, then changed:
a few values anywhere or in the plan only (another feature, another client), the
tail cut and drawn afresh (the same plan, another schedule), or the head of one
entry with the tail of another. The run's own record (the values it consumed) is
what is kept.

`explore` runs for a time and reports when each counter was first reached; with a
mutant applied it stops at the first run that violates an invariant (the mutant is
caught) and returns that run.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sim.choices import Choices
from sim.run import RunResult, run_choices
from sim.scenario import Scenario, draw_plan
from sim.schedule import Policy

# Values written into a list: read modulo each draw's bound, so any int will do.
VALUE_BOUND = 1 << 16


def bucket(count: int) -> int:
    """AFL-style hit-count buckets: 1, 2, 3, 4-7, 8-15, 16-31, ..."""
    return count if count < 4 else count.bit_length() + 1


@dataclass
class Entry:
    choices: list[int]
    reached: frozenset[tuple[str, int]]
    plan_length: int


@dataclass
class Exploration:
    runs: int = 0
    cpu: float = 0.0
    first_reached: dict[str, int] = field(default_factory=dict)  # counter -> run number
    totals: Counter[str] = field(default_factory=Counter)
    corpus: list[Entry] = field(default_factory=list)
    failure: RunResult | None = None
    failures: list[RunResult] = field(default_factory=list)

    def record(self, result: RunResult) -> None:
        """Count one run: its CPU, the counters it reached, its failure if any."""
        self.runs += 1
        self.cpu += result.cpu
        for name, n in result.coverage.items():
            if n:
                self.totals[name] += n
                self.first_reached.setdefault(name, self.runs)
        if result.violations:
            self.failures.append(result)
            if self.failure is None:
                self.failure = result


def plan_length(choices: list[int], scenario: Scenario, dialects: list[str], cancel: bool) -> int:
    """How many values at the head of a list the plan consumes."""
    drawn = Choices(replay=choices)
    draw_plan(drawn, scenario, dialects, cancel)
    return drawn.used


class Explorer:
    def __init__(
        self,
        run: Callable[[Choices], RunResult],
        scenario: Scenario,
        dialects: list[str],
        can_cancel: bool,
        rng: random.Random,
    ) -> None:
        self._run = run
        self.scenario = scenario
        self.dialects = dialects
        self.can_cancel = can_cancel
        self.rng = rng
        self.seen: set[tuple[str, int]] = set()
        self.state = Exploration()

    def step(self, choices: Choices) -> RunResult:
        result = self._run(choices)
        self.state.record(result)
        reached = frozenset((name, bucket(n)) for name, n in result.coverage.items() if n)
        if reached - self.seen:
            self.seen |= reached
            record = list(result.choices)
            length = plan_length(record, self.scenario, self.dialects, self.can_cancel)
            self.state.corpus.append(Entry(record, reached, length))
        return result

    def candidate(self) -> list[int]:
        """A mutated corpus entry (the corpus must not be empty)."""
        rng, corpus, totals = self.rng, self.state.corpus, self.state.totals

        def weight(entry: Entry) -> float:
            return sum(1.0 / (1 + totals[name]) for name, _ in entry.reached)

        entry = rng.choices(corpus, weights=[weight(e) for e in corpus])[0]
        choices = list(entry.choices)
        op = rng.randrange(4)
        if op == 0:  # a few values anywhere
            for _ in range(rng.randint(1, 4)):
                if choices:
                    choices[rng.randrange(len(choices))] = rng.randrange(VALUE_BOUND)
        elif op == 1:  # the plan: another feature, fault, client
            for _ in range(rng.randint(1, 3)):
                if entry.plan_length:
                    choices[rng.randrange(entry.plan_length)] = rng.randrange(VALUE_BOUND)
        elif op == 2:  # the same plan, the tail drawn afresh
            cut = rng.randint(entry.plan_length, max(entry.plan_length, len(choices)))
            choices = choices[:cut] + [rng.randrange(VALUE_BOUND) for _ in range(len(choices))]
        else:  # one entry's plan with another's schedule
            other = rng.choice(corpus)
            choices = choices[: entry.plan_length] + other.choices[other.plan_length :]
            choices += [rng.randrange(VALUE_BOUND) for _ in range(len(choices) // 4)]
        return choices


def explore(
    seconds: float,
    *,
    scenario: Scenario,
    dialects: list[str],
    can_cancel: bool,
    policy: Policy = "native",
    start: int = 1,
    stop_at_failure: bool = False,
    warmup: int = 8,
) -> Exploration:
    """Explore for `seconds` (CPU) from `warmup` fresh seeds; with `stop_at_failure`,
    until the first run that violates an invariant."""

    def run(choices: Choices) -> RunResult:
        return run_choices(choices, scenario=scenario, policy=policy, dialects=dialects)

    explorer = Explorer(run, scenario, dialects, can_cancel, random.Random(start))
    began = time.process_time()
    seed = start
    while time.process_time() - began < seconds:
        if explorer.state.runs < warmup or not explorer.state.corpus:
            explorer.step(Choices(seed=seed))
            seed += 1
        else:
            explorer.step(Choices(replay=explorer.candidate()))
        if stop_at_failure and explorer.state.failure is not None:
            break
    return explorer.state


def random_seeds(
    seconds: float,
    *,
    scenario: Scenario,
    dialects: list[str],
    policy: Policy = "native",
    start: int = 1,
    stop_at_failure: bool = False,
) -> Exploration:
    """The baseline: fresh seeds only, for the same time."""
    state = Exploration()
    began = time.process_time()
    seed = start
    while time.process_time() - began < seconds:
        result = run_choices(
            Choices(seed=seed), scenario=scenario, policy=policy, dialects=dialects
        )
        seed += 1
        state.record(result)
        if stop_at_failure and state.failure is not None:
            break
    return state
