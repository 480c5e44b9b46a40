"""Honest figures from a noisy machine: paired repeats, medians, spreads.

Every repeat measures every side once, in an order that rotates from repeat to
repeat, so that a drift of the machine's speed (shared hosts, frequency scaling,
other people's jobs) hits all sides alike. A comparison is the median over the
repeats of the per-repeat ratio, with the smallest and largest ratio beside it:
not each side's best of N (the best of one side and the best of the other come
from different moments, and their ratio above 1.0 is often just the machine's
drift).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Series:
    """One figure of one side, one value per repeat (None: not measured then)."""

    values: list[float | None] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        self.values.append(value)

    @property
    def present(self) -> list[float]:
        return [v for v in self.values if v is not None]

    def summary(self, digits: int = 1) -> str:
        """median (min-max)"""
        values = self.present
        if not values:
            return "-"
        median = statistics.median(values)
        if len(values) == 1:
            return f"{median:.{digits}f}"
        return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def paired_ratio(ours: Series, theirs: Series) -> str:
    """Median of the per-repeat ratios ours/theirs (min-max), over the repeats
    where both were measured."""
    ratios = [
        a / b
        # Series of figures a side does not measure are shorter: no pair there.
        for a, b in zip(ours.values, theirs.values, strict=False)
        if a is not None and b is not None and b > 0
    ]
    if not ratios:
        return "-"
    median = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{median:.3f}"
    return f"{median:.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def rotation(sides: Sequence[str], repeat: int) -> list[str]:
    """The order of the sides in a repeat: rotated by one each repeat."""
    k = repeat % len(sides)
    return [*sides[k:], *sides[:k]]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
