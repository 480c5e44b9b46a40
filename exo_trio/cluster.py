"""The node's part in the cluster: membership and leadership.

Membership: which peers are linked, and which are lost (down past the grace).
Leadership: every node runs the same loop; only the node that `elect` names acts
as leader: it asks its members to grant it a term, then rebuilds the instance
table from the nodes' reports, tears down failed instances, places models that
have none, and broadcasts its view; the others report to it and obey its shard
commands (fenced by term). Placement requests (/v1/instances) go to the leader.

The decisions live in cluster_state.py and placement.py (pure functions); this is
the imperative shell around them. Requests never pass through here: the Router
(router.py) takes them to an instance, and the cluster tells it only what routing
needs, through the `Routing` interface (peers up, down and lost; the view).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from exo_trio import cluster_state as decide
from exo_trio.cluster_messages import (
    ClusterMessage,
    ClusterView,
    InstanceSpec,
    InstanceStatus,
    ModelInfo,
    NodeFacts,
    NodeReport,
    PlaceReply,
    PlaceRequest,
    ShardSpec,
    StartShard,
    StopShard,
    VoteReply,
    VoteRequest,
)
from exo_trio.observer import Observer
from exo_trio.placement import PlacementError, ShardPlan, place, shard_bytes
from exo_trio.shard_manager import ShardManager

log = logging.getLogger(__name__)

Send = Callable[[str, ClusterMessage], bool]


class Routing(Protocol):
    """What the cluster tells the router (router.py) about membership and
    leadership, and all it asks of it."""

    def peer_up(self, peer: str) -> None:
        """Linked (again); called before anything else can be sent on the link."""
        ...

    def peer_down(self, peer: str) -> None:
        """Link down; the peer may come back within the grace."""
        ...

    def peer_lost(self, peer: str) -> None:
        """Down past the grace: gone for good."""
        ...

    def view_changed(self, view: ClusterView) -> None: ...

    def summary(self) -> dict[str, Any]:
        """Routing's counters, for GET /state."""
        ...


@dataclass
class ClusterSettings:
    tick: float = 0.25  # how often the leader loop runs and reports are sent
    # How long a lost peer's requests wait for the link to come back before
    # they are failed (a reconnect within this window loses nothing).
    peer_grace: float = 2.0
    # How long a placed instance may take to report all its ranks ready.
    start_timeout: float = 120.0
    # Before the first automatic placement, wait until every configured peer is
    # connected, or this long, so nodes started together share one instance.
    settle: float = 10.0
    auto_place: bool = True
    expected_peers: int = 0


@dataclass
class _Call:
    done: trio.Event = field(default_factory=trio.Event)
    reply: PlaceReply | None = None


class Cluster:
    def __init__(
        self,
        *,
        node_id: str,
        host: str,
        models: dict[str, ModelInfo],
        serve: tuple[str, ...],
        shards: ShardManager,
        router: Routing,
        send: Send,
        memory_free: Callable[[], int],
        free_ports: Callable[[], tuple[int, ...]],
        new_id: Callable[[str], str],
        settings: ClusterSettings | None = None,
        remembered_vote: decide.Vote | None = None,
        remember_vote: Callable[[decide.Vote], None] | None = None,
        observer: Observer | None = None,
        facts: Callable[[], NodeFacts] = NodeFacts,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.models = models
        self.serve = serve
        self.shards = shards
        self.router = router
        self.send = send  # to a peer's link outbox, or to this node itself
        self._memory_free = memory_free
        self._free_ports = free_ports
        self._new_id = new_id
        self.settings = settings or ClusterSettings()
        self._observer = observer or Observer()
        self.members: set[str] = {node_id}
        # The highest term this node knows of (its fence: shard commands of a lower
        # term are refused), and the term it granted last and to whom. The grant
        # outlives a restart (remember_vote writes it down, remembered_vote is what
        # the previous life wrote): a node never grants a term it granted before.
        self.vote: decide.Vote | None = remembered_vote
        self.term = remembered_vote.term if remembered_vote else 0
        self._remember_vote = remember_vote
        self._facts = facts  # for people to look at (node_facts.py), read by no decision
        self.leader = ""  # nobody yet: the first tick elects (and asks for term 1)
        self.view: ClusterView | None = None
        # As leader: the term it leads in, the members it asked for that term and
        # those that granted it. Leader-only messages go to granted members only.
        self.lead_term = 0
        self._asked: set[str] = set()
        self._granted: set[str] = set()
        # Leader-only soft state, rebuilt from reports after every leader change.
        self.reports: dict[str, NodeReport] = {}
        self.pending: dict[str, decide.Pending] = {}
        self.suppressed: set[str] = set()  # models whose instance a user deleted
        self._calls: dict[str, _Call] = {}
        self._down_since: dict[str, float] = {}
        self._wake = trio.Event()
        self._started_at = 0.0
        self._settled = False
        # Automatic placement that keeps failing is retried with backoff.
        self._auto_attempts: dict[str, tuple[int, float]] = {}

    def changed(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The loop every node runs: a tick every `settings.tick`, or at once when
        something changed."""
        self._started_at = trio.current_time()
        task_status.started()
        while True:
            self._tick()
            with trio.move_on_after(self.settings.tick):
                await self._wake.wait()
            self._wake = trio.Event()

    # ---- membership ----

    def on_peer_up(self, peer_id: str) -> None:
        log.info("peer %s up", peer_id)
        self._observer.peer_up(peer_id)
        self.members.add(peer_id)
        self._down_since.pop(peer_id, None)
        self.router.peer_up(peer_id)
        self.changed()

    def on_peer_down(self, peer_id: str, reason: str) -> None:
        log.warning("peer %s down: %s", peer_id, reason)
        self._observer.peer_down(peer_id, reason)
        self.members.discard(peer_id)
        self.reports.pop(peer_id, None)
        # If it comes back (perhaps restarted), it is asked again, for a new term.
        self._asked.discard(peer_id)
        self._granted.discard(peer_id)
        now = trio.current_time()
        self._down_since.setdefault(peer_id, now)
        self.router.peer_down(peer_id)
        # A placement still starting on that peer gives up now: the peer that comes
        # back may be a restarted process that never got (or lost) its shard.
        for instance_id, item in list(self.pending.items()):
            if any(s.node_id == peer_id for s in item.spec.shards):
                self.pending[instance_id] = decide.Pending(item.spec, min(item.deadline, now))
        self.changed()

    def _expire_lost_peers(self, now: float) -> None:
        """Peers down longer than the grace period are gone for good (the router
        ends their requests)."""
        for peer_id, since in list(self._down_since.items()):
            if now - since < self.settings.peer_grace:
                continue
            del self._down_since[peer_id]
            self.router.peer_lost(peer_id)

    # ---- the loop every node runs ----

    def _tick(self) -> None:
        now = trio.current_time()
        self._expire_lost_peers(now)
        self._settle(now)
        before = self.leader
        leader = decide.elect(self.members)
        if leader != self.leader:
            log.info("leader is now %s", leader)
            self.leader = leader
            if leader == self.node_id:
                self.reports = {}
                self.pending = {}
                self._asked = set()  # a new leadership asks everyone, for a new term
        if self.leader == self.node_id:
            if decide.must_ask(self.lead_term, self.term, self.members, self._asked):
                self._ask_for_term()
            self.reports[self.node_id] = self.report()
            self._lead(now)
        else:
            self.send(self.leader, self.report())
        if self.leader != before:
            # Published once the tick is done (a new leader has asked for its term).
            self._observer.leader_changed(before, self.leader, self.term)

    # ---- terms: granted by votes ----

    def _ask_for_term(self) -> None:
        """Lead in a term above every term this node has seen: grant it to itself
        and ask every member for it. Until a member grants it, the member gets no
        view and no shard command from this leader."""
        self.term += 1
        self.lead_term = self.term
        self._grant(decide.Vote(self.term, self.node_id))
        self._asked = set(self.members)
        self._granted = set()
        # Decisions in this term rest on reports sent in it: a report from before a
        # member granted the term may predate commands the member has since obeyed
        # (or refused), and judging on it tears down healthy instances.
        self.reports = {}
        log.info("asking %d member(s) for term %d", len(self.members) - 1, self.term)
        for member in sorted(self.members - {self.node_id}):
            self.send(member, VoteRequest(term=self.term))
        self._on_granted(self.node_id)

    def _grant(self, vote: decide.Vote) -> None:
        if vote == self.vote:
            return
        self.vote = vote
        if self._remember_vote is not None:
            self._remember_vote(vote)

    def _on_granted(self, member: str) -> None:
        self._granted.add(member)
        # Placements started in an older term may have been refused as stale there:
        # start them again in this one (starting is idempotent), unless given up.
        now = trio.current_time()
        for item in list(self.pending.values()):
            if item.deadline <= now:
                continue
            for target, start in decide.start_actions(item.spec, self.lead_term):
                if target == member:
                    self._command(target, start)
        if self._confirmed():
            log.info("leading the cluster in term %d", self.lead_term)

    def _confirmed(self) -> bool:
        """Leading in the newest term this node knows, granted by every member."""
        return (
            self.leader == self.node_id
            and self.lead_term == self.term
            and self.members <= self._granted
        )

    def _command(self, member: str, message: ClusterView | StartShard | StopShard) -> None:
        """Send a leader-only message: only to a member that granted the term."""
        if member in self._granted:
            self.send(member, message)

    def report(self) -> NodeReport:
        return NodeReport(
            node_id=self.node_id,
            term=self.term,
            memory_free=self._memory_free(),
            models=tuple(self.models.values()),
            serve=self.serve,
            shards=self.shards.statuses(),
            host=self.host,
            free_ports=self._free_ports(),
            facts=self._facts(),
        )

    def _lead(self, now: float) -> None:
        reports = {k: v for k, v in self.reports.items() if k in self.members}
        self.reports = reports
        if not self._confirmed():
            return  # a member has not granted the term yet: it answers within a trip
        if not self.members <= set(reports):
            # A new leader (or a new member, or a new term) whose report has not
            # arrived yet: judging instances now would call that member's shards lost
            # and tear down work that is fine. A member reports as soon as it grants
            # a term, and every tick, so this waits a trip or a tick.
            return
        if not self._settled:
            # A node that has just (re)started links to its peers one by one: a peer
            # not reached yet would look lost, and its instances be torn down.
            return
        statuses = decide.instance_statuses(reports, self.pending, now)
        self.pending = decide.extend_deadlines(
            self.pending, statuses, now, self.settings.start_timeout
        )
        for target, stop in decide.teardown(statuses, self.lead_term):
            self._command(target, stop)
        for status in statuses:
            if status.state == "ready":
                self._auto_attempts.pop(status.spec.model, None)
            if status.state in ("ready", "failed"):
                # Up (its shards' reports carry it from now on) or given up on.
                self.pending.pop(status.spec.instance_id, None)
        if self.settings.auto_place:
            for model_id in decide.models_to_place(reports, statuses):
                if model_id not in self.suppressed:
                    self._auto_place(model_id, reports, now)
        view = ClusterView(
            term=self.lead_term,
            leader=self.node_id,
            nodes=decide.summaries(reports),
            instances=tuple(decide.instance_statuses(reports, self.pending, now)),
        )
        self._adopt(view)
        for member in sorted(self.members - {self.node_id}):
            self._command(member, view)

    def _settle(self, now: float) -> None:
        """Settled (for good) once every configured peer was linked at once, or
        `settle` seconds after the start: a leader decides nothing before."""
        if not self._settled:
            peers = len(self.members) - 1
            waited = now - self._started_at
            self._settled = peers >= self.settings.expected_peers or waited >= self.settings.settle

    def _auto_place(self, model_id: str, reports: dict[str, NodeReport], now: float) -> None:
        attempts, not_before = self._auto_attempts.get(model_id, (0, 0.0))
        if now < not_before:
            return
        self._auto_attempts[model_id] = (attempts + 1, now + min(30.0, 0.5 * 2**attempts))
        try:
            placement = decide.auto_placement(reports, model_id)
            info = decide.find_model(reports, model_id)
            self._launch(placement, reports, now, auto=True, info=info)
        except PlacementError as exc:
            log.warning("cannot place %s: %s", model_id, exc)

    def _launch(
        self,
        placement: Any,
        reports: dict[str, NodeReport],
        now: float,
        *,
        auto: bool,
        info: ModelInfo | None,
    ) -> InstanceSpec:
        used = {s.port for p in self.pending.values() for s in p.spec.shards}
        ports = {}
        for shard in placement.shards:
            free = [p for p in reports[shard.node_id].free_ports if p not in used]
            if not free:
                raise PlacementError(f"node {shard.node_id} reported no free port")
            ports[shard.node_id] = free[0]
            used.add(free[0])
        spec = decide.instance_spec(
            placement, reports, self._new_id("inst"), ports, auto=auto, info=info
        )
        self.pending[spec.instance_id] = decide.Pending(spec, now + self.settings.start_timeout)
        log.info(
            "placing %s as %s on %s",
            spec.model,
            spec.instance_id,
            ", ".join(f"{s.node_id}[{s.start_layer}:{s.end_layer}]" for s in spec.shards),
        )
        for target, start in decide.start_actions(spec, self.lead_term):
            self._command(target, start)
        return spec

    # ---- placement requests (HTTP /v1/instances) ----

    async def place(self, request: PlaceRequest, patience: float = 10.0) -> PlaceReply:
        """Answer a placement or deletion request, forwarding it to the leader."""
        if self.leader == self.node_id:
            return self._answer_place(request)
        call = _Call()
        self._calls[request.call_id] = call
        try:
            if not self.send(self.leader, request):
                return PlaceReply(
                    call_id=request.call_id, ok=False, status=503, message="leader unreachable"
                )
            with trio.move_on_after(patience):
                await call.done.wait()
        finally:
            self._calls.pop(request.call_id, None)
        if call.reply is None:
            return PlaceReply(
                call_id=request.call_id, ok=False, status=504, message="leader did not answer"
            )
        return call.reply

    def _answer_place(self, request: PlaceRequest) -> PlaceReply:
        def reply(
            ok: bool, status: int, message: str, spec: InstanceSpec | None = None
        ) -> PlaceReply:
            return PlaceReply(
                call_id=request.call_id, ok=ok, status=status, message=message, instance=spec
            )

        if not self._confirmed():
            return reply(False, 503, "the leader is not confirmed in its term yet")
        now = trio.current_time()
        reports = {k: v for k, v in self.reports.items() if k in self.members}
        if request.delete is not None:
            statuses = decide.instance_statuses(reports, self.pending, now)
            match = [s for s in statuses if s.spec.instance_id == request.delete]
            if not match:
                return reply(False, 404, f"no instance {request.delete}")
            spec = match[0].spec
            self.suppressed.add(spec.model)
            self.pending.pop(spec.instance_id, None)
            for shard in spec.shards:
                self._command(
                    shard.node_id,
                    StopShard(term=self.lead_term, instance_id=spec.instance_id, reason="deleted"),
                )
            self.changed()
            return reply(True, 200, "deleted", spec)
        # The asking node may have resolved a hub model that no node has yet.
        info = decide.find_model(reports, request.model) or request.info
        if info is None:
            return reply(False, 404, f"no node has model {request.model}")
        try:
            placement = place(
                decide.resources(reports),
                decide.model_spec(info),
                request.sharding,
                node_ids=list(request.nodes) if request.nodes is not None else None,
                min_nodes=request.min_nodes,
            )
            spec = self._launch(placement, reports, now, auto=False, info=info)
        except PlacementError as exc:
            return reply(False, 400, str(exc))
        self.suppressed.discard(request.model)
        self.changed()
        return reply(True, 201, "placing", spec)

    # ---- message handlers ----

    def on_message(self, peer: str, message: ClusterMessage) -> None:
        handler = self._handlers.get(type(message))
        if handler is None:
            log.warning("unexpected %s from %s", type(message).__name__, peer)
            return
        handler(self, peer, message)

    def _on_report(self, peer: str, report: NodeReport) -> None:
        if self.leader != self.node_id or peer not in self.members:
            return
        if report.term > self.term:
            # The member granted a newer term to another leader: the next tick asks
            # everyone for a term above it.
            self.term = report.term
            self.changed()
        if report.term >= self.lead_term:  # sent since it granted this term
            self.reports[peer] = report
        else:
            self._observer.stale_report(peer, report)

    def _on_vote_request(self, peer: str, request: VoteRequest) -> None:
        granted = decide.may_grant(self.term, self.vote, request.term, peer)
        if granted:
            self.term = request.term
            self._grant(decide.Vote(request.term, peer))
            # Tick now: the leader waits for a report sent in its new term (and a
            # leader that gave its term away asks for a newer one).
            self.changed()
        else:
            log.info("refusing term %d to %s (know term %d)", request.term, peer, self.term)
        self.send(peer, VoteReply(term=request.term, granted=granted, known=self.term))

    def _on_vote_reply(self, peer: str, reply: VoteReply) -> None:
        if reply.known > self.term:
            self.term = reply.known
            self.changed()
        if self.leader != self.node_id or reply.term != self.lead_term or peer not in self._asked:
            return  # an answer for an older term (or leadership)
        if reply.granted:
            if peer not in self._granted:
                self._on_granted(peer)
                if self._confirmed():
                    self.changed()  # the leader acts at once
            return
        # Refused: the member granted this term (or a later one) to another leader.
        # It is asked again at the next tick (now), in a term above all it knows.
        log.info("%s refused term %d (knows term %d)", peer, reply.term, reply.known)
        self._asked.discard(peer)
        self.changed()

    def _on_view(self, peer: str, view: ClusterView) -> None:
        if decide.Vote(view.term, view.leader) != self.vote:
            log.debug("ignoring view of term %d from %s: not granted", view.term, peer)
            return
        self._adopt(view)

    def _adopt(self, view: ClusterView) -> None:
        self.view = view
        self.router.view_changed(view)
        self._observer.view_changed(view)

    def _fenced(self, term: int, what: str, peer: str) -> bool:
        if term < self.term:
            log.warning("rejecting %s from %s: stale term %d < %d", what, peer, term, self.term)
            return True
        self.term = term
        return False

    def _on_start(self, peer: str, message: StartShard) -> None:
        if not self._fenced(message.term, "StartShard", peer):
            self.shards.start(message.instance, message.rank)

    def _on_stop(self, peer: str, message: StopShard) -> None:
        if not self._fenced(message.term, "StopShard", peer):
            self.shards.stop(message.instance_id, message.reason)

    def _on_place(self, peer: str, request: PlaceRequest) -> None:
        if self.leader != self.node_id:
            answer = PlaceReply(
                call_id=request.call_id, ok=False, status=503, message="not the leader"
            )
        else:
            answer = self._answer_place(request)
        self.send(peer, answer)

    def _on_place_reply(self, peer: str, reply: PlaceReply) -> None:
        call = self._calls.get(reply.call_id)
        if call is not None:
            call.reply = reply
            call.done.set()

    _handlers: dict[type, Callable[[Cluster, str, Any], None]] = {
        NodeReport: _on_report,
        ClusterView: _on_view,
        StartShard: _on_start,
        StopShard: _on_stop,
        VoteRequest: _on_vote_request,
        VoteReply: _on_vote_reply,
        PlaceRequest: _on_place,
        PlaceReply: _on_place_reply,
    }

    def instance_fetched(self, instance_id: str) -> bool:
        """Every rank of the instance has its model files (the leader's view)."""
        if self.view is None:
            return False
        return any(s.spec.instance_id == instance_id and s.fetched for s in self.view.instances)

    def live_instances(self) -> list[InstanceStatus]:
        """The view's instances that are not failed (placing to ready)."""
        if self.view is None:
            return []
        return [s for s in self.view.instances if s.state != "failed"]

    def state(self) -> dict[str, Any]:
        view = self.view
        return {
            "node_id": self.node_id,
            "leader": self.leader,
            "term": self.term,
            "members": sorted(self.members),
            "nodes": [] if view is None else [_plain(n) for n in view.nodes],
            "instances": [] if view is None else [_instance(s) for s in view.instances],
            "shards": [
                {
                    "instance_id": s.instance.instance_id,
                    "rank": s.rank,
                    "state": s.state,
                    "error": s.error,
                    "active_requests": s.active_requests,
                    "download": {"completed": s.download_completed, "total": s.download_total},
                    "tokens_per_second": round(s.tokens_per_second, 2),
                }
                for s in self.shards.statuses()
            ],
            "relay": self.router.summary(),
        }


def _plain(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


def _instance(status: InstanceStatus) -> dict[str, Any]:
    spec = status.spec
    return {
        "id": spec.instance_id,
        "model": spec.model,
        "sharding": spec.sharding,
        "backend": spec.backend,
        "state": status.state,
        "error": status.error,
        "auto": spec.auto,
        "shards": [{**_plain(s), "memory_bytes": _shard_memory(spec, s)} for s in spec.shards],
        "download": {"completed": status.download_completed, "total": status.download_total},
        "tokens_per_second": round(status.tokens_per_second, 2),
        "repo": spec.info.repo if spec.info is not None else None,
        "commit": spec.info.commit if spec.info is not None else None,
    }


def _shard_memory(spec: InstanceSpec, shard: ShardSpec) -> int:
    """The weights a shard holds (what placement budgeted for it); 0 if unknown."""
    if spec.info is None:
        return 0
    plan = ShardPlan(shard.node_id, shard.rank, shard.start_layer, shard.end_layer)
    return shard_bytes(decide.model_spec(spec.info), spec.sharding, plan, spec.world_size)
