"""Shrinking a failing choice list to a short reproduction.

Works on the recorded list only (the simulator reads everything from it, and a
list that runs out reads as zeros, the simple choices): first delete chunks (or,
failing that, zero them), halving their size down to single values, then halve
the values left. A candidate is kept when it still violates the same kind of invariant;
the list kept is what that run actually consumed, so it only ever gets shorter
or simpler. The passes repeat until nothing changes or the time budget is spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sim.run import RunResult

# Runs a candidate list; returns the result (its `choices` are what it consumed).
Runner = Callable[[list[int]], RunResult]


@dataclass
class ShrinkReport:
    choices: list[int]
    result: RunResult
    attempts: int
    original_length: int


def shrink(original: RunResult, run: Runner, kind: str, budget: float = 60.0) -> ShrinkReport:
    deadline = time.monotonic() + budget
    original.choices = strip(original.choices)
    best = original
    attempts = 0

    def try_candidate(candidate: list[int]) -> bool:
        nonlocal best, attempts
        attempts += 1
        result = run(candidate)
        result.choices = strip(result.choices)
        if kind in result.kinds and _simpler(result.choices, best.choices):
            best = result
            return True
        return False

    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        size = max(1, len(best.choices) // 2)
        while size >= 1 and time.monotonic() < deadline:
            i = len(best.choices) - size
            while i >= 0 and time.monotonic() < deadline:
                current = best.choices
                if try_candidate(current[:i] + current[i + size :]):
                    changed = True
                elif any(current[i : i + size]):
                    if try_candidate(current[:i] + [0] * size + current[i + size :]):
                        changed = True
                i = min(i, len(best.choices)) - size
            size //= 2
        i = len(best.choices) - 1
        while i >= 0 and time.monotonic() < deadline:
            current = best.choices
            if i < len(current) and current[i] > 1:
                candidate = current[:]
                candidate[i] = current[i] // 2
                if try_candidate(candidate):
                    changed = True
            i -= 1
    return ShrinkReport(best.choices, best, attempts, len(original.choices))


def strip(choices: list[int]) -> list[int]:
    """Trailing zeros say nothing (a list that runs out reads as zeros)."""
    end = len(choices)
    while end and choices[end - 1] == 0:
        end -= 1
    return choices[:end]


def _simpler(candidate: list[int], current: list[int]) -> bool:
    """Shorter, or as long and smaller value by value (shortlex)."""
    if len(candidate) != len(current):
        return len(candidate) < len(current)
    return candidate < current
