"""The start policy alone (runner/start_policy.py): pure functions of the waiting
requests and the step time."""

from __future__ import annotations

import random

import pytest

from exo_trio.runner.start_policy import (
    HOLD_FRACTION,
    HOLD_GAP_MAX,
    HOLD_MAX,
    PASS_COST_TOKENS,
    hold_seconds,
    prefill_groups,
)

STEP = 0.040  # a decode step of 40 ms
GAP = min(HOLD_GAP_MAX, HOLD_FRACTION * STEP)


def test_a_busy_runner_never_holds() -> None:
    # What arrived during a step starts at the next one: a joiner's one-step start.
    assert hold_seconds([10.0], 10.0, STEP, busy=True) == 0.0
    assert hold_seconds([9.99, 10.0], 10.0, STEP, busy=True) == 0.0


def test_nothing_waiting_nothing_to_hold() -> None:
    assert hold_seconds([], 10.0, STEP, busy=False) == 0.0


def test_an_idle_runner_waits_a_gap_after_the_last_arrival() -> None:
    assert hold_seconds([10.0], 10.0, STEP, busy=False) == pytest.approx(GAP)
    assert hold_seconds([10.0], 10.0 + GAP / 2, STEP, busy=False) == pytest.approx(GAP / 2)
    # The gap passed without another arrival: start.
    assert hold_seconds([10.0], 10.0 + GAP, STEP, busy=False) == 0.0
    # Each arrival extends the wait by a gap from itself ...
    arrivals = [10.0, 10.0 + GAP * 0.9]
    assert hold_seconds(arrivals, arrivals[-1], STEP, busy=False) == pytest.approx(GAP)


def test_a_stream_of_arrivals_is_not_held_forever() -> None:
    # ... but never beyond a step (at most HOLD_MAX) from the first.
    arrivals = [10.0 + i * GAP * 0.9 for i in range(100)]
    now = arrivals[-1]
    assert hold_seconds(arrivals, now, STEP, busy=False) == 0.0
    total = min(HOLD_MAX, STEP)
    assert hold_seconds(arrivals[:3], arrivals[2], STEP, busy=False) <= total
    assert hold_seconds(arrivals[:3], arrivals[2], 10.0, busy=False) <= HOLD_MAX


def test_the_gap_follows_the_step_time_up_to_its_cap() -> None:
    fast = hold_seconds([10.0], 10.0, 0.002, busy=False)
    slow = hold_seconds([10.0], 10.0, 2.0, busy=False)
    assert fast == pytest.approx(HOLD_FRACTION * 0.002)
    assert slow == pytest.approx(HOLD_GAP_MAX)
    assert hold_seconds([10.0], 10.0, 0.0, busy=False) == 0.0


def cost(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + PASS_COST_TOKENS for g in groups)


def test_similar_prompts_share_one_pass() -> None:
    lengths = [20, 25, 22, 30, 18, 27, 24, 21]
    assert prefill_groups(lengths) == [list(range(8))]


def test_a_long_prompt_gets_a_pass_of_its_own() -> None:
    lengths = [20, 1500, 25, 22]
    assert prefill_groups(lengths) == [[0, 2, 3], [1]]


def test_groups_cover_every_request_once() -> None:
    assert prefill_groups([]) == []
    assert prefill_groups([7]) == [[0]]
    rng = random.Random(5)
    for _ in range(50):
        lengths = [rng.choice([1, 5, 40, 300, 2000]) + rng.randrange(10) for _ in range(12)]
        groups = prefill_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(g == sorted(g) for g in groups)


def all_partitions(items: list[int]) -> list[list[list[int]]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for partition in all_partitions(rest):
        out.append([[first], *partition])
        for k in range(len(partition)):
            out.append([*partition[:k], [first, *partition[k]], *partition[k + 1 :]])
    return out


def test_grouping_is_the_cheapest_of_all_partitions() -> None:
    rng = random.Random(11)
    for n in range(1, 7):
        for _ in range(10):
            lengths = [rng.choice([1, 3, 10, 30, 60, 200]) for _ in range(n)]
            best = min(cost(lengths, p) for p in all_partitions(list(range(n))))
            assert cost(lengths, prefill_groups(lengths)) == best, lengths
