"""Placement is a pure function: plans and refusals for every situation."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo_trio.placement import (
    ModelSpec,
    NodeResources,
    PlacementError,
    place,
    split_layers,
)

GiB = 2**30
MODEL = ModelSpec(
    "m", size_bytes=8 * GiB, n_layers=32, n_heads=32, n_kv_heads=8, supports_tensor=True
)


def node(node_id: str, free_gib: float, models: tuple[str, ...] = ("m",)) -> NodeResources:
    return NodeResources(node_id, int(free_gib * GiB), frozenset(models))


def test_one_big_node_takes_the_whole_model() -> None:
    plan = place([node("a", 4), node("b", 16)], MODEL)
    assert plan.node_ids == ("b",)
    assert [(s.start_layer, s.end_layer) for s in plan.shards] == [(0, 32)]


def test_pipeline_splits_layers_in_proportion_to_free_memory() -> None:
    plan = place([node("a", 9), node("b", 4.5)], MODEL, node_ids=["a", "b"])
    assert [(s.node_id, s.rank, s.start_layer, s.end_layer) for s in plan.shards] == [
        ("a", 0, 0, 21),
        ("b", 1, 21, 32),
    ]


def test_automatic_uses_the_fewest_nodes_that_fit() -> None:
    plan = place([node("a", 5), node("b", 5), node("c", 5)], MODEL)
    assert len(plan.shards) == 2
    assert sorted(plan.node_ids) == ["a", "b"]  # ties broken by node id


def test_min_nodes_spreads_wider() -> None:
    plan = place([node("a", 50), node("b", 50), node("c", 50)], MODEL, min_nodes=3)
    assert len(plan.shards) == 3
    assert plan.shards[-1].end_layer == 32


def test_tensor_needs_divisible_heads() -> None:
    plan = place([node("a", 8), node("b", 8)], MODEL, "tensor", node_ids=["a", "b"])
    assert all((s.start_layer, s.end_layer) == (0, 32) for s in plan.shards)
    odd = ModelSpec("m", 8 * GiB, 32, n_heads=32, n_kv_heads=8, supports_tensor=True)
    with pytest.raises(PlacementError, match="divide by 3"):
        place([node("a", 8), node("b", 8), node("c", 8)], odd, "tensor", min_nodes=3)
    unsupported = ModelSpec("m", 8 * GiB, 32, 32, 8, supports_tensor=False)
    with pytest.raises(PlacementError, match="does not support tensor"):
        place([node("a", 80)], unsupported, "tensor")


@pytest.mark.parametrize(
    ("nodes", "kwargs", "reason"),
    [
        ([node("a", 100, ())], {}, "no node has model m"),
        ([node("a", 4), node("b", 4)], {}, "cannot place"),
        ([node("a", 100)], {"node_ids": ["zz"]}, "not in the cluster"),
        ([node("a", 100), node("b", 100, ())], {"node_ids": ["a", "b"]}, "does not have model"),
        ([node("a", 100)], {"min_nodes": 2}, "only 1 have model"),
        ([node("a", 100)], {"node_ids": ["a", "a"]}, "twice"),
    ],
)
def test_refusals_say_why(
    nodes: list[NodeResources], kwargs: dict[str, object], reason: str
) -> None:
    with pytest.raises(PlacementError, match=reason):
        place(nodes, MODEL, **kwargs)  # type: ignore[arg-type]


def test_more_nodes_than_layers_is_refused() -> None:
    tiny = ModelSpec("m", GiB, n_layers=2, n_heads=4, n_kv_heads=2, supports_tensor=True)
    with pytest.raises(PlacementError, match="only 2 layers"):
        place([node("a", 9), node("b", 9), node("c", 9)], tiny, node_ids=["a", "b", "c"])


@given(
    n_layers=st.integers(1, 200),
    weights=st.lists(st.integers(0, 10**12), min_size=1, max_size=12),
)
def test_split_layers_is_an_exact_contiguous_cover(n_layers: int, weights: list[int]) -> None:
    if len(weights) > n_layers or sum(weights) == 0:
        with pytest.raises(PlacementError):
            split_layers(n_layers, weights)
        return
    ranges = split_layers(n_layers, weights)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
    assert all(a < b for a, b in ranges)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(ranges))
    # Proportional within one layer of the ideal share (after the guaranteed layer each).
    spare = n_layers - len(weights)
    for (a, b), w in zip(ranges, weights, strict=True):
        assert abs((b - a - 1) - spare * w / sum(weights)) < 1 + 1e-9
