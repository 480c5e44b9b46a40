"""What the simulator observes about the cluster, for the invariants and coverage.

Each node's observer (sim/observe.py) reports here what the node publishes
(messages sent, received and handled, requests dispatched and failed, shards
stopped, links up and down) and the World reports the faults it injects. Nothing
here changes what the production code does; it only watches.

- Leader claims: every ClusterView, StartShard and StopShard that reaches another
  node names (term, leader). Two leaders claiming one term is a violation.
- Fencing: a shard command whose term is below the receiving node's term must
  change nothing there.
- Teardowns: a StopShard from a leader that still has every node of the instance
  as a linked member, for an instance whose distributed group is intact, tears
  down a healthy instance (the bug of a new leader judging before every report is
  in).
- Disturbances: what the faults touched (nodes, links between them) and when; an
  error given to a request that no disturbance touched is unexplained.
- Paths: for every dispatched request, its owner (the node its client is on), its
  entry node and its instance's nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from exo_trio.cluster_messages import (
    ClusterView,
    InstanceSpec,
    NodeReport,
    RemoteCancel,
    StartShard,
    StopShard,
)
from exo_trio.types import GenerationFailed

if TYPE_CHECKING:
    from sim.world import SimNode, World

# How long after a disturbance its consequences may still arrive: a leader acts
# at its next tick, views propagate, links reconnect after a backoff, the relay
# waits its grace, a heartbeat times out.
AFTERMATH = 6.0


def index_of_node(node_id: str) -> int:
    return int(node_id[1:])


@dataclass(frozen=True)
class Disturbance:
    kind: str  # crash, reset, partition, runner_crash, group_break
    nodes: frozenset[int]  # the node(s) it touched; a pair for a link fault
    start: float
    end: float

    def overlaps(self, start: float, end: float, slack: float = AFTERMATH) -> bool:
        return self.start <= end and start <= self.end + slack


@dataclass
class Path:
    owner: int
    spec: InstanceSpec
    dispatched_at: float

    @property
    def entry(self) -> int:
        return index_of_node(self.spec.entry_node)

    @property
    def nodes(self) -> frozenset[int]:
        return frozenset({self.owner} | {index_of_node(s.node_id) for s in self.spec.shards})


@dataclass
class Finding:
    kind: str
    message: str
    request_id: str | None = None


@dataclass
class ClusterWatch:
    world: World
    claims: dict[int, dict[str, str]] = field(default_factory=dict)  # term -> leader -> where
    findings: list[Finding] = field(default_factory=list)
    disturbances: list[Disturbance] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    peer_lost: dict[str, tuple[int, float]] = field(default_factory=dict)
    instance_stops: dict[str, float] = field(default_factory=dict)
    # Shard commands sent: (sender, addressee, command).
    shard_commands: list[tuple[str, str, StartShard | StopShard]] = field(default_factory=list)
    relayed: set[str] = field(default_factory=set)
    leader_changes: int = 0
    stale_injected: int = 0
    link_downs: list[tuple[int, int, float, str]] = field(default_factory=list)
    # Per request: the failure its owner delivered (kind, node, when), its time-out
    # (kind, when), how its scope closed (how, when), BUGGIFY sites forced on it.
    failures: dict[str, tuple[str, int, float, str]] = field(default_factory=dict)
    timeouts: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    ended: dict[str, tuple[str, float]] = field(default_factory=dict)
    # BUGGIFY firings by request: (site, when, the node that owns the request).
    buggify: dict[str, list[tuple[str, float, int]]] = field(default_factory=dict)
    # Admission refusals (node, when, exchanges held); send time-outs by connection.
    refusals: list[tuple[int, float, int, int]] = field(default_factory=list)
    send_timeouts: dict[int, float] = field(default_factory=dict)
    reports: dict[str, list[NodeReport]] = field(default_factory=dict)  # sent, by node
    # RemoteCancels by request: when first sent, and when first arrived (a link that
    # is backed up delivers them late, in order).
    cancel_sent: dict[str, float] = field(default_factory=dict)
    cancel_arrived: dict[str, float] = field(default_factory=dict)

    # ---- faults (the World) ----

    def disturbed(self, kind: str, nodes: frozenset[int], start: float, end: float) -> None:
        self.disturbances.append(Disturbance(kind, nodes, start, end))

    def touching(self, nodes: frozenset[int], start: float, end: float) -> list[Disturbance]:
        """Disturbances that touched any of `nodes` (a node fault on one of them, a
        link fault with an end among them) during [start, end], with aftermath."""
        return [d for d in self.disturbances if d.nodes & nodes and d.overlaps(start, end)]

    def link_faults(
        self, a: int, b: int, start: float, end: float | None = None
    ) -> list[Disturbance]:
        """Faults that could cut the link between a and b during [start, end]: a
        crash of either, or a fault on that link."""
        pair = frozenset((a, b))
        end = start if end is None else end
        return [
            d
            for d in self.disturbances
            if d.kind != "runner_crash"
            and (d.nodes == pair or (len(d.nodes) == 1 and d.nodes & pair))
            and d.overlaps(start, end)
        ]

    # ---- the data path ----

    def dispatched(self, node: SimNode, request_id: str, spec: InstanceSpec) -> None:
        path = Path(node.index, spec, trio.current_time())
        self.paths[request_id] = path
        if path.entry != node.index:
            self.relayed.add(request_id)
            self.world.coverage["request_relayed"] += 1

    def failed(self, node: SimNode, event: GenerationFailed) -> None:
        self.failures.setdefault(
            event.request_id, (event.kind, node.index, trio.current_time(), event.message)
        )

    def buggified(self, request_id: str, site: str, at: float, node: int) -> None:
        path = self.paths.get(request_id)  # (none yet if its dispatch was refused)
        owner = path.owner if path is not None else node
        self.buggify.setdefault(request_id, []).append((site, at, owner))

    def lost_peer(self, node: SimNode, request_id: str) -> None:
        self.peer_lost.setdefault(request_id, (node.index, trio.current_time()))

    def instance_stopped(self, instance_id: str) -> None:
        self.instance_stops.setdefault(instance_id, trio.current_time())

    # ---- control messages ----

    def claim(self, term: int, leader: str, where: str) -> None:
        leaders = self.claims.setdefault(term, {})
        if leader in leaders:
            return
        leaders[leader] = where
        if len(leaders) == 2:
            (a, wa), (b, wb) = sorted(leaders.items())
            self.findings.append(
                Finding(
                    "two_leaders",
                    f"term {term} has two leaders: {a} ({wa}) and {b} ({wb})",
                )
            )

    def received(self, node: SimNode, peer: str, message: object) -> None:
        """A message from another node arrived at `node` (before it is handled)."""
        if isinstance(message, ClusterView):
            self.claim(message.term, message.leader, f"view at {node.node_id}")
        elif isinstance(message, StartShard | StopShard):
            self.claim(message.term, peer, f"{type(message).__name__} at {node.node_id}")
        elif isinstance(message, RemoteCancel):
            self.cancel_arrived.setdefault(message.request_id, trio.current_time())

    def sent(self, node: SimNode, peer: str, message: object) -> None:
        """`node`'s cluster sends a message (to a peer, or to itself)."""
        if isinstance(message, StartShard | StopShard):
            self.shard_commands.append((node.node_id, peer, message))
        elif isinstance(message, NodeReport) and peer != node.node_id:
            self.reports.setdefault(node.node_id, []).append(message)
        elif isinstance(message, RemoteCancel):
            self.cancel_sent.setdefault(message.request_id, trio.current_time())
        if isinstance(message, StopShard) and message.reason != "deleted":
            self._judge_teardown(node, peer, message)

    def _judge_teardown(self, node: SimNode, peer: str, message: StopShard) -> None:
        cluster = node.cluster
        if cluster.leader != node.node_id:
            return
        spec = self.world.specs.get(message.instance_id)
        if spec is None:
            return
        nodes = {s.node_id for s in spec.shards}
        if not nodes <= {node.node_id, *node.links.peers()}:
            return  # a node of it is not linked to the leader: lost, as far as it can tell
        if not self.world.instance_alive(spec):
            return
        self.findings.append(
            Finding(
                "spurious_teardown",
                f"leader {node.node_id} (term {message.term}) stops {spec.instance_id} on "
                f"{peer} ({message.reason!r}) although every node of it is linked and its "
                "runners are healthy",
            )
        )

    def fence(
        self, node: SimNode, peer: str, message: object, term_before: int, before: dict[str, Any]
    ) -> None:
        """After a shard command was handled: one from a stale term changed nothing
        (`before`: the node's live shards before it)."""
        if not isinstance(message, StartShard | StopShard) or message.term >= term_before:
            return
        shards = node.shards.shards
        if isinstance(message, StartShard):
            instance_id = message.instance.instance_id
            # A new shard object: it was started now.
            applied = instance_id in shards and shards[instance_id] is not before.get(instance_id)
            applied = applied and not shards[instance_id].stopped
        else:
            shard = shards.get(message.instance_id)
            applied = message.instance_id in before and (shard is None or shard.stopped)
        if applied:
            self.findings.append(
                Finding(
                    "stale_command",
                    f"{node.node_id} (term {term_before}) applied {type(message).__name__} of "
                    f"stale term {message.term} from {peer}",
                )
            )

    def stale_report(self, member: str, term: int, now: Any) -> NodeReport | None:
        """A report `member` sent before `term`: the last one whose shards differ
        from `now` (its shards now), else the last one."""
        older = [r for r in self.reports.get(member, []) if r.term < term]
        for report in reversed(older):
            if report.shards != now:
                return report
        return older[-1] if older else None

    def stale_candidate(self, node: SimNode) -> tuple[str, StartShard | StopShard] | None:
        """A shard command of an older term than `node`'s, sent to it by another
        node, that would change something there if obeyed (the latest such, else
        any). (Only one sent to it: a leader's command to itself, or to another
        member, never travelled to `node`, and a leader of a term nobody granted
        sends nothing to others: delivering it would fake a second leader.)"""
        term = node.cluster.term
        shards = node.shards.shards
        fallback = None
        for sender, addressee, message in reversed(self.shard_commands):
            if message.term >= term or sender == node.node_id or addressee != node.node_id:
                continue
            if isinstance(message, StartShard):
                target = message.instance.shards[message.rank].node_id
                effective = target == node.node_id and message.instance.instance_id not in shards
            else:
                effective = message.instance_id in shards
            if effective:
                return sender, message
            fallback = fallback or (sender, message)
        return fallback

    # ---- links ----

    def link_down(self, node: SimNode, peer: str, reason: str) -> None:
        now = trio.current_time()
        other = index_of_node(peer)
        self.link_downs.append((node.index, other, now, reason))
        pair = frozenset((node.index, other))
        explained = [
            d
            for d in self.disturbances
            if (d.nodes & pair if len(d.nodes) == 1 else d.nodes == pair)
            and d.start <= now <= d.end + AFTERMATH
        ]
        if not explained and not node.crashed and not self.world.ending:
            self.findings.append(
                Finding(
                    "spurious_link_down",
                    f"{node.node_id} lost its link to {peer} ({reason}) although no fault "
                    "touched either node or the link between them",
                )
            )
