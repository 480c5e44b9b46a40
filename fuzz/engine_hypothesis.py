"""Fuzzing with hypothesis: the fallback engine where atheris does not install,
and the engine of the short runs in the test suite.

Inputs are seeds from the target's corpus, mutated a few times by the same
JSON-aware mutator atheris uses (its choices drawn from hypothesis, so a failure
shrinks toward an unmutated seed), or plain random bytes. Not coverage-guided;
hypothesis's shrinking makes what it finds small.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from fuzz.mutate import mutate, mutate_bytes
from fuzz.targets import Harness, Target


@dataclass
class RunResult:
    target: str
    engine: str
    inputs: int
    seconds: float
    crash: bytes | None = None
    error: str | None = None
    coverage: int | None = None  # libFuzzer's edge count, when known


class DrawnChoices:
    def __init__(self, draw: Callable[[Any], Any]) -> None:
        self.draw = draw

    def below(self, n: int) -> int:
        return int(self.draw(st.integers(0, n - 1))) if n > 1 else 0


def strategy(target: Target) -> st.SearchStrategy[bytes]:
    seeds = target.seeds() or [b""]

    @st.composite
    def inputs(draw: Callable[[Any], Any]) -> bytes:
        if draw(st.integers(0, 15)) == 15:
            return bytes(draw(st.binary(max_size=512)))
        data: bytes = draw(st.sampled_from(seeds))
        choices = DrawnChoices(draw)
        for _ in range(draw(st.integers(0, 4))):
            if target.json:
                data = mutate(data, choices, header=target.header)
            else:
                data = mutate_bytes(data, choices)
        return data

    return inputs()


def run(
    target: Target,
    seconds: float,
    *,
    rng_seed: int | None = None,
    max_inputs: int | None = None,
    harness: Harness | None = None,
) -> RunResult:
    """Fuzz `target` for about `seconds` (or `max_inputs` inputs); stops at the
    first failure, shrunk. A given `harness` is used, and left open."""
    owned = harness is None
    harness = harness if harness is not None else target.make()
    count = 0
    last: list[bytes] = []
    stop_at = time.monotonic() + seconds
    started = time.monotonic()

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(strategy(target))
    def one(data: bytes) -> None:
        nonlocal count
        if time.monotonic() > stop_at or (max_inputs is not None and count >= max_inputs):
            return
        count += 1
        last[:] = [data]
        harness.one(data)

    batch = 0
    try:
        while time.monotonic() < stop_at and (max_inputs is None or count < max_inputs):
            test = seed(rng_seed + batch)(one) if rng_seed is not None else one
            batch += 1
            try:
                test()
            except Exception as exc:
                # Hypothesis replays the shrunk example last: that is the crash.
                return RunResult(
                    target.name,
                    "hypothesis",
                    count,
                    time.monotonic() - started,
                    crash=last[0] if last else b"",
                    error=f"{type(exc).__name__}: {exc}",
                )
    finally:
        if owned:
            harness.close()
    return RunResult(target.name, "hypothesis", count, time.monotonic() - started)
