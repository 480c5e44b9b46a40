"""A pipeline rank runs from a directory holding only the weight files its layers
need (what a node of a cluster fetches of a hub model): two real runner processes,
each with its own partial copy of the demo model split into per-layer files, give
greedy output token for token the whole model's."""

from __future__ import annotations

import shutil
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from exo_trio.hub_plan import files_for_layers
from exo_trio.runner.model_files import missing_files, weight_map
from exo_trio.types import GenerationFinished
from tests.fake_hub import split_weights
from tests.runnerproc import start_runner
from tests.test_sharded_runner import collect, free_hostfile, generation

LAYERS = ((0, 2), (2, 4))


def partial_copy(split: Path, layers: tuple[int, int], out: Path) -> Path:
    """The split model with only the weight files `layers` need."""
    mapping = weight_map(split)
    assert mapping is not None
    keep = files_for_layers(mapping, *layers)
    out.mkdir(parents=True)
    for path in split.iterdir():
        if not path.name.endswith(".safetensors") or path.name in keep:
            shutil.copy(path, out / path.name)
    return out


def test_missing_files_names_what_a_rank_lacks(demo_model_dir: Path, tmp_path: Path) -> None:
    split = split_weights(demo_model_dir, tmp_path / "split")
    rank1 = partial_copy(split, LAYERS[1], tmp_path / "r1")
    assert missing_files(rank1, LAYERS[1]) == []
    assert missing_files(rank1, LAYERS[0]) == [
        "model-00002-of-00005.safetensors",
        "model-00003-of-00005.safetensors",
    ]
    assert missing_files(demo_model_dir, None) == []  # one file, no index


async def test_ranks_with_only_their_layers_files_match_the_whole_model(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    split = split_weights(demo_model_dir, tmp_path / "split")
    with trio.fail_after(60):
        async with start_runner(demo_model_dir) as whole:
            await whole.wait_ready()
            await whole.send(generation("a0", 24))
            reference, _ = await collect(whole, "a0")
    dirs = [partial_copy(split, layers, tmp_path / f"r{r}") for r, layers in enumerate(LAYERS)]
    assert not (dirs[0] / "model-00004-of-00005.safetensors").exists()
    assert not (dirs[1] / "model-00002-of-00005.safetensors").exists()
    hostfile = free_hostfile(tmp_path, 2)
    with trio.fail_after(90):
        async with AsyncExitStack() as stack:
            ranks = [
                await stack.enter_async_context(
                    start_runner(
                        dirs[rank],
                        *("--rank", str(rank), "--world-size", "2", "--hostfile", str(hostfile)),
                        *("--sharding", "pipeline", "--layers", f"{start}:{end}"),
                    )
                )
                for rank, (start, end) in enumerate(LAYERS)
            ]
            for rank in ranks:
                await rank.wait_ready()
            await ranks[0].send(generation("a1", 24))
            tokens, final = await collect(ranks[0], "a1")
            assert isinstance(final, GenerationFinished)
            assert tokens == reference
