"""The one recorded choice list every random decision of a run is drawn from.

A run never calls `random` directly: the workload, the fault plan, every fault
decision and every scheduling decision are `draw(bound)` calls on one `Choices`.
Generating from a seed records the values drawn; replaying feeds a recorded list
back (values are taken modulo the bound, a list that runs out yields zeros), so a
recorded list reproduces the run exactly and a shrinker can edit it freely.

Every call site is written so that 0 is the simplest choice (no fault, the
shortest delay, the oldest runnable task first): lowering values while shrinking
moves a failing run towards a healthy, boring one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

# Resolution of fractional draws (probabilities and durations).
FINE = 1000


class Choices:
    def __init__(self, seed: int | None = None, replay: Sequence[int] | None = None) -> None:
        if (seed is None) == (replay is None):
            raise ValueError("give exactly one of seed and replay")
        self._random = random.Random(seed).random if seed is not None else None
        self._replay: list[int] = list(replay) if replay is not None else []
        self.record: list[int] = []

    def draw(self, bound: int) -> int:
        """A value in [0, bound). A bound of 1 (no choice) records nothing."""
        if bound <= 1:
            return 0
        record = self.record
        if self._random is not None:
            value = int(self._random() * bound)
        else:
            i = len(record)
            value = self._replay[i] % bound if i < len(self._replay) else 0
        record.append(value)
        return value

    def chance(self, p: float) -> bool:
        """True with probability p; a drawn 0 is always False."""
        if p <= 0.0:
            return False
        return self.draw(FINE) >= FINE - round(p * FINE)

    def fraction(self) -> float:
        """A value in [0, 1], 0 when the drawn value is 0."""
        return self.draw(FINE + 1) / FINE

    def between(self, low: float, high: float) -> float:
        return low + (high - low) * self.fraction()

    def int_between(self, low: int, high: int) -> int:
        """An int in [low, high]."""
        return low + self.draw(high - low + 1)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.draw(len(options))]

    @property
    def used(self) -> int:
        return len(self.record)
