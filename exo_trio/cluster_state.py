"""The leader's decisions, as pure functions of the nodes' reports.

Control state is soft: nothing here is replicated, and only a node's last vote is
kept on disk (so a restart cannot make it grant a term twice). The leader is the
live member with the smallest node id; whoever becomes leader asks its members to
grant it a term above any it has seen (each node grants a term to one leader at
most, `may_grant`) and rebuilds the instance table from the shards the nodes
report. Nodes reject shard commands from lower terms, so a deposed leader that has
not noticed yet cannot start or stop anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

import msgspec

from exo_trio.cluster_messages import (
    InstanceSpec,
    InstanceStatus,
    ModelInfo,
    NodeReport,
    NodeSummary,
    RunnerSummary,
    ShardSpec,
    ShardStatus,
    StartShard,
    StopShard,
)
from exo_trio.placement import ModelSpec, NodeResources, Placement, PlacementError, place


def elect(members: Iterable[str]) -> str:
    """The leader of a membership: deterministic, so every node that sees the same
    members agrees on it. (Who leads is agreed without a vote; *in which term* is
    voted on, so that two leaders a partition made never share a term.)"""
    return min(members)


@dataclass(frozen=True)
class Vote:
    """A node's grant: in `term`, only `leader` may lead it. The one fact a node keeps
    on disk (the daemon's vote.json), so a restart cannot make it grant a term twice."""

    term: int
    leader: str


def may_grant(known: int, vote: Vote | None, term: int, candidate: str) -> bool:
    """May a node grant `term` to `candidate`? It grants each term to one leader at
    most: only a term above every term it knows (which includes every term it
    granted, to itself as a leader too), or, asked again, the very term it already
    granted to this candidate."""
    return term > known or vote == Vote(term, candidate)


def must_ask(lead_term: int, known: int, members: Set[str], asked: Set[str]) -> bool:
    """Must a leader ask its members for a new term? When it knows a term above the
    one it leads in (a member granted that to another leader, or refused it), and
    when a member has joined that it has not asked in this term (a member seen for
    the first time may have granted this very term to another leader)."""
    return known > lead_term or not members <= asked


def model_spec(info: ModelInfo) -> ModelSpec:
    return ModelSpec(
        id=info.id,
        size_bytes=info.size_bytes,
        n_layers=info.n_layers,
        n_heads=info.n_heads,
        n_kv_heads=info.n_kv_heads,
        supports_tensor=info.supports_tensor,
        downloadable=info.repo is not None,
    )


def resources(reports: Mapping[str, NodeReport]) -> list[NodeResources]:
    return [
        NodeResources(r.node_id, r.memory_free, frozenset(m.id for m in r.models))
        for r in reports.values()
    ]


def find_model(reports: Mapping[str, NodeReport], model_id: str) -> ModelInfo | None:
    for report in reports.values():
        for info in report.models:
            if info.id == model_id:
                return info
    return None


def instance_spec(
    placement: Placement,
    reports: Mapping[str, NodeReport],
    instance_id: str,
    ports: Mapping[str, int],
    *,
    auto: bool,
    info: ModelInfo | None = None,
) -> InstanceSpec:
    """Turn a placement into a spec: every rank's reachable address and port."""
    shards = tuple(
        ShardSpec(
            node_id=s.node_id,
            rank=s.rank,
            start_layer=s.start_layer,
            end_layer=s.end_layer,
            host=reports[s.node_id].host,
            port=ports[s.node_id],
        )
        for s in placement.shards
    )
    return InstanceSpec(
        instance_id=instance_id,
        model=placement.model,
        sharding=placement.sharding,
        backend="ring",
        shards=shards,
        auto=auto,
        info=info,
    )


@dataclass(frozen=True)
class Pending:
    """An instance the leader placed whose shards have not all been reported yet."""

    spec: InstanceSpec
    deadline: float


def instance_statuses(
    reports: Mapping[str, NodeReport], pending: Mapping[str, Pending], now: float
) -> list[InstanceStatus]:
    """What state every instance is in, from what the live nodes report.

    An instance is ready when every rank reports ready, failed when any rank
    failed, its node is gone, or it was placed and never came up in time.
    """
    shards: dict[str, dict[int, ShardStatus]] = {}
    specs: dict[str, InstanceSpec] = {}
    for report in reports.values():
        for status in report.shards:
            if status.state == "stopped":
                continue
            spec = status.instance
            specs.setdefault(spec.instance_id, spec)
            shards.setdefault(spec.instance_id, {})[status.rank] = status
    for instance_id, item in pending.items():
        specs.setdefault(instance_id, item.spec)
    result = []
    for instance_id in sorted(specs):
        spec = specs[instance_id]
        seen = shards.get(instance_id, {})
        status = _status(spec, seen, reports, pending.get(instance_id), now)
        result.append(_with_progress(status, seen))
    return result


def _with_progress(status: InstanceStatus, seen: Mapping[int, ShardStatus]) -> InstanceStatus:
    """The ranks' download progress summed, rank 0's token rate (every token of
    the instance comes out of rank 0), and whether every rank has its files."""
    entry = seen.get(0)
    return msgspec.structs.replace(
        status,
        download_completed=sum(s.download_completed for s in seen.values()),
        download_total=sum(s.download_total for s in seen.values()),
        tokens_per_second=entry.tokens_per_second if entry is not None else 0.0,
        fetched=len(seen) == status.spec.world_size
        and not any(s.state == "downloading" for s in seen.values()),
    )


def extend_deadlines(
    pending: Mapping[str, Pending], statuses: Iterable[InstanceStatus], now: float, timeout: float
) -> dict[str, Pending]:
    """A placement whose shards are still downloading is not late: its start
    timeout counts from when the downloads end. (A download that stalls fails on
    its own, through huggingface_hub's timeouts and retries.)"""
    extended = dict(pending)
    for status in statuses:
        key = status.spec.instance_id
        item = pending.get(key)
        if item is not None and status.state == "downloading":
            extended[key] = Pending(item.spec, max(item.deadline, now + timeout))
    return extended


def _status(
    spec: InstanceSpec,
    seen: Mapping[int, ShardStatus],
    reports: Mapping[str, NodeReport],
    pending: Pending | None,
    now: float,
) -> InstanceStatus:
    for shard in spec.shards:
        if shard.node_id not in reports:
            return InstanceStatus(spec=spec, state="failed", error=f"node {shard.node_id} lost")
    for status in seen.values():
        if status.state == "failed":
            return InstanceStatus(
                spec=spec,
                state="failed",
                error=f"rank {status.rank}: {status.error}",
                gave_up=status.gave_up,
            )
    if pending is None:
        # Placed earlier and no longer starting: a rank its node no longer reports
        # is gone (the node restarted, quicker than its link could time out, and
        # lost it), however healthy the other ranks look.
        for shard in spec.shards:
            if shard.rank not in seen:
                return InstanceStatus(
                    spec=spec,
                    state="failed",
                    error=f"rank {shard.rank} is gone from node {shard.node_id}",
                )
    if len(seen) == spec.world_size and all(s.state == "ready" for s in seen.values()):
        return InstanceStatus(spec=spec, state="ready")
    if any(s.state in ("downloading", "fetched") for s in seen.values()):
        return InstanceStatus(spec=spec, state="downloading")
    if pending is not None and now > pending.deadline:
        return InstanceStatus(spec=spec, state="failed", error="did not come up in time")
    if not seen:
        return InstanceStatus(spec=spec, state="placing")
    return InstanceStatus(spec=spec, state="loading")


def teardown(statuses: Iterable[InstanceStatus], term: int) -> list[tuple[str, StopShard]]:
    """Stop every surviving shard of every failed instance, except those that gave
    up loading: they hold no runner, and stay listed to say why the model is not
    served (until a user deletes the instance or places the model again)."""
    actions = []
    for status in statuses:
        if status.state != "failed" or status.gave_up:
            continue
        for shard in status.spec.shards:
            actions.append(
                (
                    shard.node_id,
                    StopShard(
                        term=term,
                        instance_id=status.spec.instance_id,
                        reason=status.error or "failed",
                    ),
                )
            )
    return actions


def start_actions(spec: InstanceSpec, term: int) -> list[tuple[str, StartShard]]:
    return [(s.node_id, StartShard(term=term, instance=spec, rank=s.rank)) for s in spec.shards]


def models_to_place(
    reports: Mapping[str, NodeReport], statuses: Iterable[InstanceStatus]
) -> list[str]:
    """Models some node was started to serve that have no live instance (a model
    whose instance gave up loading is not placed again)."""
    wanted = sorted({m for r in reports.values() for m in r.serve})
    covered = {s.spec.model for s in statuses if s.state != "failed" or s.gave_up}
    return [m for m in wanted if m not in covered]


def auto_placement(reports: Mapping[str, NodeReport], model_id: str) -> Placement:
    """Automatic placement spans every live node that has the model and was started
    to serve it (pipeline), falling back to the fewest nodes that fit."""
    info = find_model(reports, model_id)
    if info is None:
        raise PlacementError(f"no node has model {model_id}")
    spec = model_spec(info)
    servers = [r for r in reports.values() if model_id in r.serve]
    nodes = resources(reports)
    try:
        return place(nodes, spec, "pipeline", node_ids=sorted(r.node_id for r in servers))
    except PlacementError:
        return place(nodes, spec, "pipeline")


def summaries(reports: Mapping[str, NodeReport]) -> tuple[NodeSummary, ...]:
    return tuple(
        NodeSummary(
            node_id=r.node_id,
            memory_free=r.memory_free,
            models=tuple(m.id for m in r.models),
            host=r.host,
            facts=r.facts,
            runners=tuple(
                RunnerSummary(
                    instance_id=s.instance.instance_id,
                    rank=s.rank,
                    state=s.state,
                    active_requests=s.active_requests,
                    error=s.error,
                )
                for s in r.shards
            ),
        )
        for r in sorted(reports.values(), key=lambda r: r.node_id)
    )
