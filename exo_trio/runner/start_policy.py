"""When and how waiting requests are started: pure functions, no MLX, no clock.

Two decisions, both from the waiting requests and the step time alone:

1. `hold_seconds`: how much longer an idle runner waits for more requests before
   starting the ones that arrived. Clients that fire a burst (eight requests at
   once) reach the runner spread over a few milliseconds: the node parses and
   tokenizes them one after another. An idle runner that started the first at
   once would prefill it alone, and the others, arriving meanwhile, would wait
   for that whole step (a prefill is many decode steps long on a CPU) before
   starting together in the next: their first tokens a step apart. Waiting a
   fraction of a step for more keeps a burst together, at the price of that
   wait for a request that really comes alone; so the wait is short: a quarter
   of a decode step after each arrival (at most HOLD_GAP_MAX), a step in all (at
   most HOLD_MAX). Measured here (2 shared cores, heavily loaded): eight
   concurrent HTTP clients' requests reached the runner over 0-31 ms, up to ~10
   ms apart. A runner that is decoding never holds: what arrived during a step
   starts at the next one (a request joining a decoding batch keeps its one-step
   start, and a burst that arrives mid-step is already together).

2. `prefill_groups`: which of the requests starting in one step share a padded
   forward pass. Every row of a padded pass computes as many positions as the
   longest, so one long prompt with seven short ones would make the short ones
   compute the long one's length. Lengths are sorted and cut into runs so that
   the padding computed plus PASS_COST_TOKENS per extra pass is smallest (an
   exact dynamic program: the best partition of sorted lengths is into runs).
   All groups run in the same step, so every request starting in it gets its
   first token at the end of that step either way; the grouping only sets how
   long the step is.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "HOLD_FRACTION",
    "HOLD_GAP_MAX",
    "HOLD_MAX",
    "PASS_COST_TOKENS",
    "hold_seconds",
    "prefill_groups",
]

# An idle runner waits for the next arrival HOLD_FRACTION of a decode step after
# the last one (at most HOLD_GAP_MAX seconds), and a decode step in all (at most
# HOLD_MAX seconds).
HOLD_FRACTION = 0.25
HOLD_GAP_MAX = 0.02
HOLD_MAX = 0.05
# What one more forward pass costs, in prompt tokens of padding it may save. A
# pass reads every weight once: on a CPU (compute-bound prefill) that is worth a
# few tokens, on a GPU hundreds; 32 keeps a burst of similar chat prompts in one
# pass and puts a long prompt in a pass of its own.
PASS_COST_TOKENS = 32


def hold_seconds(
    arrivals: Sequence[float], now: float, step_seconds: float, *, busy: bool
) -> float:
    """How much longer to wait for more requests before starting the ones waiting
    (0: start now). `arrivals`: when each waiting request arrived, in order;
    `step_seconds`: the runner's recent decode step; `busy`: the runner has
    requests decoding (then it never waits)."""
    if busy or not arrivals:
        return 0.0
    step = max(0.0, step_seconds)
    gap = min(HOLD_GAP_MAX, HOLD_FRACTION * step)
    deadline = min(arrivals[-1] + gap, arrivals[0] + min(HOLD_MAX, step))
    return max(0.0, deadline - now)


def prefill_groups(lengths: Sequence[int], pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Indices of `lengths` (the tokens each request must prefill) grouped into
    padded passes: every group is one pass computing len(group) x max length
    positions. Minimises positions computed + pass_cost per pass; groups are in
    order of length, indices within a group in their original order."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    # best[j]: the least cost of grouping the j shortest; cut[j]: where its last run starts.
    best = [0] + [0] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = min(
            (best[i] + (j - i) * sorted_lengths[j - 1] + pass_cost, i) for i in range(j)
        )
    runs: list[list[int]] = []
    j = n
    while j > 0:
        i = cut[j]
        runs.append(sorted(order[i:j]))
        j = i
    return runs[::-1]
