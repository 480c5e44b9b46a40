"""Placement: which nodes run a model, and which layers each one holds.

A pure function of its inputs (the nodes' free memory and models, the model's size
and shape, the request), so that every decision can be tested exhaustively and the
leader can recompute it after any membership change. It either returns a complete
plan or raises PlacementError with a reason a user can act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Sharding = Literal["pipeline", "tensor"]

# Leave room for activations, the KV cache and the runtime: a shard may take at most
# this fraction of a node's free memory.
MEMORY_HEADROOM = 0.9


class PlacementError(Exception):
    """The model cannot be placed as asked; the message says why."""


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    memory_free: int  # bytes
    models: frozenset[str]


@dataclass(frozen=True)
class ModelSpec:
    id: str
    size_bytes: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    supports_tensor: bool
    # A hub model: a node that does not have it fetches its share, so every node
    # can take part.
    downloadable: bool = False


@dataclass(frozen=True)
class ShardPlan:
    node_id: str
    rank: int
    start_layer: int  # first layer held (inclusive)
    end_layer: int  # last layer held (exclusive)


@dataclass(frozen=True)
class Placement:
    model: str
    sharding: Sharding
    shards: tuple[ShardPlan, ...]

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.shards)


def place(
    nodes: Sequence[NodeResources],
    model: ModelSpec,
    sharding: Sharding = "pipeline",
    *,
    node_ids: Sequence[str] | None = None,
    min_nodes: int = 1,
) -> Placement:
    """Choose nodes and a layer split for `model`.

    With `node_ids`, exactly those nodes, in that order (rank 0 first). Otherwise
    the fewest nodes (at least `min_nodes`) that hold the model and fit it, taking
    the nodes with the most free memory first (ties by node id, for determinism).
    Pipeline: contiguous layer ranges in proportion to free memory. Tensor: every
    node holds every layer, a 1/k slice of each.
    """
    if sharding not in ("pipeline", "tensor"):
        raise PlacementError(f"unknown sharding {sharding!r}: use 'pipeline' or 'tensor'")
    by_id = {n.node_id: n for n in nodes}
    if node_ids is not None:
        chosen = _explicit(by_id, model, node_ids)
    else:
        chosen = _automatic(list(nodes), model, sharding, min_nodes)
    if sharding == "tensor":
        _check_tensor(model, len(chosen))
        shards = tuple(
            ShardPlan(n.node_id, rank, 0, model.n_layers) for rank, n in enumerate(chosen)
        )
    else:
        shards = _pipeline_shards(model, chosen)
    _check_fits(model, sharding, chosen, shards)
    return Placement(model.id, sharding, shards)


def _explicit(
    by_id: dict[str, NodeResources], model: ModelSpec, node_ids: Sequence[str]
) -> list[NodeResources]:
    if not node_ids:
        raise PlacementError("nodes is empty")
    if len(set(node_ids)) != len(node_ids):
        raise PlacementError("nodes lists a node twice")
    chosen = []
    for node_id in node_ids:
        node = by_id.get(node_id)
        if node is None:
            raise PlacementError(f"node {node_id} is not in the cluster")
        if not _has(node, model):
            raise PlacementError(f"node {node_id} does not have model {model.id}")
        chosen.append(node)
    return chosen


def _automatic(
    nodes: list[NodeResources], model: ModelSpec, sharding: Sharding, min_nodes: int
) -> list[NodeResources]:
    candidates = sorted(
        (n for n in nodes if _has(n, model)), key=lambda n: (-n.memory_free, n.node_id)
    )
    if not candidates:
        raise PlacementError(f"no node has model {model.id}")
    if min_nodes > len(candidates):
        raise PlacementError(
            f"{min_nodes} nodes asked for, but only {len(candidates)} have model {model.id}"
        )
    reasons = []
    for count in range(max(1, min_nodes), len(candidates) + 1):
        chosen = candidates[:count]
        try:
            if sharding == "tensor":
                _check_tensor(model, count)
                shards = tuple(
                    ShardPlan(n.node_id, r, 0, model.n_layers) for r, n in enumerate(chosen)
                )
            else:
                shards = _pipeline_shards(model, chosen)
            _check_fits(model, sharding, chosen, shards)
        except PlacementError as exc:
            reasons.append(f"{count} node(s): {exc}")
            continue
        return chosen
    raise PlacementError("cannot place: " + "; ".join(reasons))


def _has(node: NodeResources, model: ModelSpec) -> bool:
    return model.downloadable or model.id in node.models


def _check_tensor(model: ModelSpec, count: int) -> None:
    if not model.supports_tensor:
        raise PlacementError(f"model {model.id} does not support tensor parallelism")
    if model.n_heads % count or model.n_kv_heads % count:
        raise PlacementError(
            f"tensor parallelism over {count} nodes needs the head counts "
            f"({model.n_heads} heads, {model.n_kv_heads} kv heads) to divide by {count}"
        )


def split_layers(n_layers: int, weights: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous layer ranges in proportion to `weights`, every range non-empty.

    Largest-remainder apportionment after giving each part one layer, so the
    result is exact, deterministic and never leaves a node without a layer.
    """
    parts = len(weights)
    if parts > n_layers:
        raise PlacementError(f"{parts} nodes but only {n_layers} layers")
    total = sum(weights)
    spare = n_layers - parts
    if total <= 0:
        raise PlacementError("no free memory on the chosen nodes")
    quotas = [spare * w / total for w in weights]
    counts = [1 + int(q) for q in quotas]
    leftover = n_layers - sum(counts)
    # Hand out what is left by largest remainder; ties go to the earlier rank.
    order = sorted(range(parts), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    for i in order[:leftover]:
        counts[i] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def _pipeline_shards(model: ModelSpec, chosen: list[NodeResources]) -> tuple[ShardPlan, ...]:
    ranges = split_layers(model.n_layers, [n.memory_free for n in chosen])
    return tuple(
        ShardPlan(node.node_id, rank, start, end)
        for rank, (node, (start, end)) in enumerate(zip(chosen, ranges, strict=True))
    )


def shard_bytes(model: ModelSpec, sharding: Sharding, shard: ShardPlan, count: int) -> int:
    if sharding == "tensor":
        return -(-model.size_bytes // count)
    return -(-model.size_bytes * (shard.end_layer - shard.start_layer) // model.n_layers)


def _check_fits(
    model: ModelSpec,
    sharding: Sharding,
    chosen: list[NodeResources],
    shards: tuple[ShardPlan, ...],
) -> None:
    for node, shard in zip(chosen, shards, strict=True):
        need = shard_bytes(model, sharding, shard, len(chosen))
        have = int(node.memory_free * MEMORY_HEADROOM)
        if need > have:
            raise PlacementError(
                f"node {node.node_id} needs {need / 2**20:.0f} MiB for its shard "
                f"but has {have / 2**20:.0f} MiB usable"
            )


def memory_shortfall(model: str, size_bytes: int, free: Sequence[int]) -> str | None:
    """Why a model of `size_bytes` of weights cannot run on nodes with `free` bytes
    of free memory each, even split across all of them; None if it can."""
    usable = sum(int(f * MEMORY_HEADROOM) for f in free)
    if size_bytes <= usable:
        return None
    nodes = f"{len(free)} node" + ("s" if len(free) != 1 else "")
    return (
        f"{model} is too big for this cluster's memory: its weights need "
        f"{size_bytes / 2**30:.1f} GiB, and the cluster ({nodes}) has "
        f"{usable / 2**30:.1f} GiB usable ({MEMORY_HEADROOM:.0%} of its free memory)"
    )
