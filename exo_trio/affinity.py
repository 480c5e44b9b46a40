"""CPU placement: a lone runner's model compute on its own cores, the node's event
loop on the others (Linux only; elsewhere nothing is pinned).

Every generated token wakes the node (read the runner's frame, route it, write
the HTTP chunk) while the runner computes the next one. Left to the scheduler,
those wake-ups land on whichever core is free at that instant, which is often the
one the runner's MLX threads were about to use, and the next decode step waits.
Measured on the project's 2-core machine with the demo model: one stream through
HTTP reached 0.67-0.88 of raw mlx-lm with nothing pinned, 0.92-0.94 with the
runner on one core and the node (and the client) on the other.

A child process inherits its parent's cores, so every runner is started with an
explicit set: its own cores for a lone runner, all of them for the others.

The split is a pure function of the cores the node may use: the node keeps a
quarter of them (at least one), the runners get the rest. Only the runner of a
one-rank instance is pinned: the ranks of a model split across nodes may share a
machine (nodes on one host), and every node pinning its rank to the same cores
would stack them (measured: a 2-node pipeline on one 2-core machine fell from 0.6
to 0.19 of one node with both ranks on the nodes' core). `exo-trio node
--cpu-affinity off` turns all of it off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreSplit:
    node: frozenset[int]
    runners: frozenset[int]


def split_cores(cores: Iterable[int]) -> CoreSplit | None:
    """The node's and the runners' cores, or None when there are too few to split."""
    ordered = sorted(set(cores))
    if len(ordered) < 2:
        return None
    node = max(1, len(ordered) // 4)
    return CoreSplit(node=frozenset(ordered[-node:]), runners=frozenset(ordered[:-node]))


def runner_cores(split: CoreSplit | None, world_size: int) -> frozenset[int] | None:
    """The cores to start a runner on: a lone runner's own, or every core for a rank
    of a split model (a child would otherwise inherit the node's); None: unpinned."""
    if split is None:
        return None
    return split.runners if world_size == 1 else split.node | split.runners


def usable_cores() -> frozenset[int] | None:
    """The cores this process may run on, or None where that cannot be known or set."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


def pin_this_thread(cores: Iterable[int]) -> bool:
    """Pin the calling thread; threads it starts afterwards inherit the set. Call it
    before starting any thread so that the whole process follows."""
    wanted = set(cores)
    if not wanted or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:  # a core offline or outside our cgroup: run unpinned
        log.warning("cannot pin to cores %s: %s", sorted(wanted), exc)
        return False
    return True


def format_cores(cores: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def parse_cores(text: str) -> frozenset[int]:
    """`0,1,3` -> {0, 1, 3}; ValueError on anything else."""
    cores = frozenset(int(part) for part in text.split(","))
    if any(c < 0 for c in cores):
        raise ValueError(f"negative core number in {text!r}")
    return cores
