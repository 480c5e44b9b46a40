"""CPU placement (exo_trio/affinity.py): the split, and a runner really pinned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exo_trio.affinity import CoreSplit, parse_cores, runner_cores, split_cores
from tests.nodeproc import serving
from tests.runnerproc import start_runner


def test_the_node_keeps_a_quarter_of_the_cores_and_the_runners_get_the_rest() -> None:
    assert split_cores([0]) is None
    assert split_cores([0, 1]) == CoreSplit(node=frozenset({1}), runners=frozenset({0}))
    split = split_cores(range(8))
    assert split == CoreSplit(node=frozenset({6, 7}), runners=frozenset(range(6)))
    # Whatever cores the process may use, not just 0..n-1.
    assert split_cores([5, 3, 9]) == CoreSplit(frozenset({9}), frozenset({3, 5}))


def test_a_lone_runner_gets_the_runner_cores_and_a_rank_gets_them_all() -> None:
    split = CoreSplit(node=frozenset({3}), runners=frozenset({0, 1, 2}))
    assert runner_cores(split, 1) == {0, 1, 2}
    # A rank of a split model must not inherit the node's core: nodes sharing a
    # machine would stack their ranks there.
    assert runner_cores(split, 2) == {0, 1, 2, 3}
    assert runner_cores(None, 1) is None


def test_core_lists_parse_strictly() -> None:
    assert parse_cores("0,2") == {0, 2}
    for bad in ("", "a", "1,-1", "1;2"):
        with pytest.raises(ValueError):
            parse_cores(bad)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and two cores",
)
@pytest.mark.trio
async def test_a_runner_started_with_cpus_runs_only_there(demo_model_dir: Path) -> None:
    core = min(os.sched_getaffinity(0))
    async with start_runner(demo_model_dir, "--cpus", str(core)) as runner:
        await runner.wait_ready()
        assert os.sched_getaffinity(runner.proc.pid) == {core}
        # Its threads too (MLX's included): they were started after the pin.
        for tid in os.listdir(f"/proc/{runner.proc.pid}/task"):
            assert os.sched_getaffinity(int(tid)) == {core}


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and two cores",
)
def test_a_node_runs_on_its_cores_and_its_lone_runner_on_the_others(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    split = split_cores(os.sched_getaffinity(0))
    assert split is not None
    with serving(demo_model_dir, tmp_path / "node") as node:
        pid = node.process.pid
        for tid in os.listdir(f"/proc/{pid}/task"):
            assert os.sched_getaffinity(int(tid)) == split.node
        threads = os.listdir(f"/proc/{pid}/task")
        children = [
            child
            for tid in threads
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        ]
        assert children, "the runner process"
        for child in children:
            for tid in os.listdir(f"/proc/{child}/task"):
                assert os.sched_getaffinity(int(tid)) == split.runners
