"""Placing hub models (pure decisions): any node can take part, since a node that
lacks the model fetches its share; an instance whose shards are downloading is
"downloading", not late; progress and token rates add up per instance."""

from __future__ import annotations

import pytest

from exo_trio import cluster_state as decide
from exo_trio.cluster_messages import (
    InstanceSpec,
    ModelInfo,
    NodeReport,
    ShardSpec,
    ShardStatus,
)
from exo_trio.placement import NodeResources, PlacementError, place

GIB = 2**30
LOCAL = ModelInfo(
    id="local",
    size_bytes=GIB,
    n_layers=8,
    n_heads=8,
    n_kv_heads=8,
    supports_tensor=True,
    context_length=4096,
)
HUB = ModelInfo(
    id="org/m",
    size_bytes=GIB,
    n_layers=8,
    n_heads=8,
    n_kv_heads=8,
    supports_tensor=True,
    context_length=4096,
    repo="org/m",
    commit="c" * 40,
)


def nodes(*free: int) -> list[NodeResources]:
    return [
        NodeResources(f"n{i}", f, frozenset({"local"} if i == 0 else ()))
        for i, f in enumerate(free)
    ]


def test_a_hub_model_can_go_to_nodes_that_do_not_have_it() -> None:
    with pytest.raises(PlacementError, match="3 nodes asked for, but only 1 have model local"):
        place(nodes(0, 8 * GIB), decide.model_spec(LOCAL), node_ids=None, min_nodes=3)
    plan = place(nodes(GIB // 4, 8 * GIB), decide.model_spec(HUB))
    assert plan.node_ids == ("n1",)
    plan = place(nodes(GIB // 2, GIB // 2, GIB // 2), decide.model_spec(HUB))
    assert len(plan.node_ids) == 3
    with pytest.raises(PlacementError, match="node n1 does not have model local"):
        place(nodes(8 * GIB, 8 * GIB), decide.model_spec(LOCAL), node_ids=["n1"])
    assert place(nodes(8 * GIB, 8 * GIB), decide.model_spec(HUB), node_ids=["n1"]).node_ids == (
        "n1",
    )


def spec(world: int = 2) -> InstanceSpec:
    shards = tuple(
        ShardSpec(node_id=f"n{r}", rank=r, start_layer=4 * r, end_layer=4 * r + 4, host="h", port=1)
        for r in range(world)
    )
    return InstanceSpec(
        instance_id="inst",
        model="org/m",
        sharding="pipeline",
        backend="ring",
        shards=shards,
        auto=False,
        info=HUB,
    )


def report(node: str, *shards: ShardStatus) -> NodeReport:
    return NodeReport(
        node_id=node,
        term=1,
        memory_free=8 * GIB,
        models=(),
        serve=(),
        shards=shards,
        host="h",
        free_ports=(),
    )


def test_downloading_shards_make_a_downloading_instance_that_is_not_late() -> None:
    inst = spec()
    reports = {
        "n0": report(
            "n0",
            ShardStatus(
                instance=inst,
                rank=0,
                state="downloading",
                download_completed=10,
                download_total=100,
            ),
        ),
        "n1": report("n1", ShardStatus(instance=inst, rank=1, state="loading")),
    }
    pending = {"inst": decide.Pending(inst, deadline=5.0)}
    (status,) = decide.instance_statuses(reports, pending, now=100.0)
    assert status.state == "downloading"
    assert (status.download_completed, status.download_total) == (10, 100)
    extended = decide.extend_deadlines(pending, [status], now=100.0, timeout=120.0)
    assert extended["inst"].deadline == 220.0
    # Once downloaded and still not up by the (extended) deadline: failed.
    reports["n0"] = report("n0", ShardStatus(instance=inst, rank=0, state="loading"))
    (late,) = decide.instance_statuses(reports, extended, now=221.0)
    assert late.state == "failed" and late.error == "did not come up in time"


def test_an_instance_reports_its_entry_ranks_token_rate() -> None:
    inst = spec()
    reports = {
        "n0": report(
            "n0", ShardStatus(instance=inst, rank=0, state="ready", tokens_per_second=42.5)
        ),
        "n1": report(
            "n1", ShardStatus(instance=inst, rank=1, state="ready", tokens_per_second=40.0)
        ),
    }
    (status,) = decide.instance_statuses(reports, {}, now=0.0)
    assert status.state == "ready" and status.tokens_per_second == 42.5
    assert (
        decide.instance_spec(
            place([NodeResources("n0", 8 * GIB, frozenset())], decide.model_spec(HUB)),
            {"n0": report("n0")},
            "i",
            {"n0": 1},
            auto=True,
            info=HUB,
        ).info
        == HUB
    )


def test_the_ranks_start_once_every_rank_has_its_files() -> None:
    inst = spec()
    downloading = ShardStatus(instance=inst, rank=0, state="downloading")
    fetched = ShardStatus(instance=inst, rank=0, state="fetched")
    waiting = ShardStatus(instance=inst, rank=1, state="fetched")
    pending = {"inst": decide.Pending(inst, deadline=50.0)}

    def status(*shards: ShardStatus):  # type: ignore[no-untyped-def]
        reports = {f"n{s.rank}": report(f"n{s.rank}", s) for s in shards}
        reports.setdefault("n0", report("n0"))
        reports.setdefault("n1", report("n1"))
        (result,) = decide.instance_statuses(reports, pending, now=0.0)
        return result

    # Rank 1's node has not reported its shard yet: rank 0 must not start.
    assert not status(fetched).fetched and status(fetched).state == "downloading"
    assert not status(downloading, waiting).fetched
    both = status(fetched, waiting)
    assert both.fetched and both.state == "downloading"
