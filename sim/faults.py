"""Seeded faults: at the production fault points and on the simulated streams.

Faults only fire inside the plan's early window; after it the system runs
healthy, so that safety (nothing lost, nothing duplicated) is checked under
faults and liveness (every stream ends) after them. The window opens when the
cluster first has a ready instance (start-up itself runs unfaulted).
"""

from __future__ import annotations

import math
from collections import Counter

import trio

from exo_trio.seams import FaultPoints
from sim.choices import Choices
from sim.pipes import Shaper
from sim.scenario import FaultPlan
from sim.trace import Trace


class Window:
    """The early fault window: closed until `open()`, then `length` seconds long."""

    def __init__(self, length: float) -> None:
        self.length = length
        self.start = math.inf
        self.end = math.inf

    def open(self, now: float) -> None:
        self.start = now
        self.end = now + self.length

    def active(self) -> bool:
        return self.start <= trio.current_time() < self.end


class SimFaultPoints(FaultPoints):
    """The simulator's fault points: at each hit, maybe a reschedule (other tasks
    run first), maybe a seeded delay; at each BUGGIFY site the run enabled, the
    error path forced with the run's probability. Production's are no-ops."""

    def __init__(
        self,
        choices: Choices,
        plan: FaultPlan,
        window: Window,
        trace: Trace,
        delay_max: float,
        buggify: tuple[str, ...] = (),
        buggify_p: float = 0.0,
    ) -> None:
        self.choices = choices
        self.plan = plan
        self.window = window
        self.trace = trace
        self.delay_max = delay_max
        self.buggify = frozenset(buggify)
        self.buggify_p = buggify_p
        self.hits: Counter[str] = Counter()
        self.delays: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()

    async def hit(self, name: str, request_id: str | None = None) -> None:
        self.hits[name] += 1
        if not self.window.active():
            return
        choices = self.choices
        if choices.chance(self.plan.point_delay_p):
            delay = choices.between(0.0, self.delay_max)
            self.delays[name] += 1
            self.trace.add("fault", name, request_id, f"{delay:.4f}")
            await trio.sleep(delay)
        elif choices.chance(self.plan.point_yield_p):
            await trio.lowlevel.checkpoint()

    def fire(self, name: str, *context: object) -> bool:
        """Force the error path at an enabled site, in the fault window only (so
        that liveness is checked after it, as for every other fault)."""
        if name not in self.buggify or not self.window.active():
            return False
        if not self.choices.chance(self.buggify_p):
            return False
        self.fired[name] += 1
        return True


def link_shaper(
    choices: Choices,
    window: Window,
    delay_p: float,
    split_p: float,
    delay_max: float,
    always: bool = False,
) -> Shaper:
    """Delays and splits writes on one direction of a simulated stream (in the
    fault window, or `always`: a slow network, not a fault). Bytes stay in order;
    different streams drift apart."""

    def shape(size: int) -> list[tuple[int, float]]:
        if not always and not window.active():
            return [(size, 0.0)]
        delay = choices.between(0.0, delay_max) if choices.chance(delay_p) else 0.0
        if size > 1 and choices.chance(split_p):
            cut = 1 + choices.draw(size - 1)
            later = delay + choices.between(0.0, delay_max)
            return [(cut, delay), (size - cut, later)]
        return [(size, delay)]

    return shape
