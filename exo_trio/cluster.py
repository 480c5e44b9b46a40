"""The node's part in the cluster: membership, the leader's loop, shard commands,
and the handlers for every node-to-node message.

The decisions live in cluster_state.py and placement.py (pure functions); this is
the imperative shell around them. Every node runs the same loop; only the node
that `elect` names acts as leader: it asks its members to grant it a term, then
rebuilds the instance table from the nodes' reports, tears down failed instances,
places models that have none, and broadcasts its view. Requests never pass
through the leader: a node dispatches to the entry node (rank 0) of a ready
instance, locally or through the TokenRelay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from exo_trio import cluster_state as decide
from exo_trio.cluster_messages import (
    CancelReply,
    CancelRequest,
    ClusterMessage,
    ClusterView,
    InstanceSpec,
    InstanceStatus,
    ModelInfo,
    NodeReport,
    PlaceReply,
    PlaceRequest,
    RemoteAck,
    RemoteCancel,
    RemoteEvents,
    RemoteGenerate,
    RemoteResume,
    StartShard,
    StopShard,
    VoteReply,
    VoteRequest,
)
from exo_trio.node import CancelOutcome
from exo_trio.placement import PlacementError, place
from exo_trio.shard_manager import ShardManager
from exo_trio.token_relay import TokenRelay
from exo_trio.types import GenerationFailed, TextGeneration
from exo_trio.worker import RunnerUnavailable, Worker

log = logging.getLogger(__name__)


class Links(Protocol):
    def send(self, peer_id: str, message: Any) -> bool: ...

    async def run(self, *, task_status: trio.TaskStatus[Any] = ...) -> None: ...


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


@dataclass
class _CancelCall:
    """A cancel asked of the peers: done at the first yes, or when all said no."""

    waiting: set[str]
    done: trio.Event = field(default_factory=trio.Event)
    cancelled: bool = False


# How long POST /v1/cancel waits for the other nodes to say whether a request is
# theirs; a peer silent for that long leaves the answer "unknown" (a 503).
CANCEL_PATIENCE = 2.0


class Cluster:
    def __init__(
        self,
        *,
        node_id: str,
        host: str,
        models: dict[str, ModelInfo],
        serve: tuple[str, ...],
        shards: ShardManager,
        relay: TokenRelay,
        memory_free: Callable[[], int],
        free_ports: Callable[[], tuple[int, ...]],
        new_id: Callable[[str], str],
        settings: ClusterSettings | None = None,
        remembered_vote: decide.Vote | None = None,
        remember_vote: Callable[[decide.Vote], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.models = models
        self.serve = serve
        self.shards = shards
        self.relay = relay
        self._memory_free = memory_free
        self._free_ports = free_ports
        self._new_id = new_id
        self.settings = settings or ClusterSettings()
        self.links: Links | None = None
        self.members: set[str] = {node_id}
        # The highest term this node knows of (its fence: shard commands of a lower
        # term are refused), and the term it granted last and to whom. The grant
        # outlives a restart (remember_vote writes it down, remembered_vote is what
        # the previous life wrote): a node never grants a term it granted before.
        self.vote: decide.Vote | None = remembered_vote
        self.term = remembered_vote.term if remembered_vote else 0
        self._remember_vote = remember_vote
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
        self._cancel_calls: dict[str, _CancelCall] = {}
        self._cancel_owned: Callable[[str], bool] = lambda request_id: False
        self._down_since: dict[str, float] = {}
        self._wake = trio.Event()
        self._started_at = 0.0
        self._settled = False
        # Automatic placement that keeps failing is retried with backoff.
        self._auto_attempts: dict[str, tuple[int, float]] = {}

    # ---- wiring ----

    def attach(self, links: Links) -> None:
        self.links = links

    def send(self, node_id: str, message: ClusterMessage) -> bool:
        if node_id == self.node_id:
            self.on_message(node_id, message)
            return True
        return self.links is not None and self.links.send(node_id, message)

    def changed(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            if self.links is not None:
                await nursery.start(self.links.run)
            nursery.start_soon(self._loop)
            task_status.started()

    async def _loop(self) -> None:
        while True:
            self._tick()
            with trio.move_on_after(self.settings.tick):
                await self._wake.wait()
            self._wake = trio.Event()

    # ---- membership ----

    def on_peer_up(self, peer_id: str) -> None:
        log.info("peer %s up", peer_id)
        self.members.add(peer_id)
        self._down_since.pop(peer_id, None)
        self.relay.on_peer_up(peer_id)
        self.changed()

    def on_peer_down(self, peer_id: str, reason: str) -> None:
        log.warning("peer %s down: %s", peer_id, reason)
        self.members.discard(peer_id)
        self.reports.pop(peer_id, None)
        # If it comes back (perhaps restarted), it is asked again, for a new term.
        self._asked.discard(peer_id)
        self._granted.discard(peer_id)
        now = trio.current_time()
        self._down_since.setdefault(peer_id, now)
        # A placement still starting on that peer gives up now: the peer that comes
        # back may be a restarted process that never got (or lost) its shard.
        for instance_id, item in list(self.pending.items()):
            if any(s.node_id == peer_id for s in item.spec.shards):
                self.pending[instance_id] = decide.Pending(item.spec, min(item.deadline, now))
        self.changed()

    def _expire_lost_peers(self, now: float) -> None:
        """Peers down longer than the grace period are gone for good: their
        requests end with an explicit error, and their requests here stop."""
        for peer_id, since in list(self._down_since.items()):
            if now - since < self.settings.peer_grace:
                continue
            del self._down_since[peer_id]
            failed = self.relay.fail_routes(peer_id, f"node {peer_id} was lost")
            for request_id in self.relay.drop_origin(peer_id):
                self._cancel_local(request_id)
            if failed:
                log.warning("node %s lost: failed %d request(s)", peer_id, failed)

    # ---- the loop every node runs ----

    def _tick(self) -> None:
        now = trio.current_time()
        self._expire_lost_peers(now)
        self._settle(now)
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
        self.view = view
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
            self._launch(placement, reports, now, auto=True)
        except PlacementError as exc:
            log.warning("cannot place %s: %s", model_id, exc)

    def _launch(
        self, placement: Any, reports: dict[str, NodeReport], now: float, *, auto: bool
    ) -> InstanceSpec:
        used = {s.port for p in self.pending.values() for s in p.spec.shards}
        ports = {}
        for shard in placement.shards:
            free = [p for p in reports[shard.node_id].free_ports if p not in used]
            if not free:
                raise PlacementError(f"node {shard.node_id} reported no free port")
            ports[shard.node_id] = free[0]
            used.add(free[0])
        spec = decide.instance_spec(placement, reports, self._new_id("inst"), ports, auto=auto)
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
        info = decide.find_model(reports, request.model)
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
            spec = self._launch(placement, reports, now, auto=False)
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
        self.view = view

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

    # ---- cancel by id, from any node (POST /v1/cancel) ----

    def accept_cancels(self, cancel: Callable[[str], bool]) -> None:
        self._cancel_owned = cancel

    async def cancel_elsewhere(
        self, request_id: str, patience: float = CANCEL_PATIENCE
    ) -> CancelOutcome:
        """Ask every linked peer to cancel `request_id` if it owns it (its client is
        connected there). "cancelled" as soon as one did; "absent" when every peer
        this node knows of said no; "unknown" when one could not be asked (its link
        is down) or did not answer in time."""
        call_id = self._new_id("cancel")
        # Peers down within their grace period still hold their requests.
        peers = sorted((self.members | set(self._down_since)) - {self.node_id})
        asked = {
            peer
            for peer in peers
            if self.send(peer, CancelRequest(call_id=call_id, request_id=request_id))
        }
        call = _CancelCall(waiting=set(asked))
        if asked:
            self._cancel_calls[call_id] = call
            try:
                with trio.move_on_after(patience):
                    await call.done.wait()
            finally:
                self._cancel_calls.pop(call_id, None)
        if call.cancelled:
            return "cancelled"
        return "unknown" if call.waiting or len(asked) < len(peers) else "absent"

    def _on_cancel_request(self, peer: str, request: CancelRequest) -> None:
        cancelled = self._cancel_owned(request.request_id)
        self.send(peer, CancelReply(call_id=request.call_id, cancelled=cancelled))

    def _on_cancel_reply(self, peer: str, reply: CancelReply) -> None:
        call = self._cancel_calls.get(reply.call_id)
        if call is None:
            return  # answered after the caller gave up
        call.waiting.discard(peer)
        call.cancelled = call.cancelled or reply.cancelled
        if call.cancelled or not call.waiting:
            call.done.set()

    def _on_place_reply(self, peer: str, reply: PlaceReply) -> None:
        call = self._calls.get(reply.call_id)
        if call is not None:
            call.reply = reply
            call.done.set()

    def _on_remote_generate(self, peer: str, message: RemoteGenerate) -> None:
        self.relay.accept(peer, message)
        worker = self.shards.worker(message.instance_id)
        try:
            if worker is None:
                raise RunnerUnavailable(f"instance {message.instance_id} is not running here")
            worker.submit(message.command)
        except RunnerUnavailable as exc:
            self.relay.route_event(
                GenerationFailed(
                    request_id=message.command.request_id,
                    kind="runner_unavailable",
                    message=str(exc),
                )
            )

    def _on_remote_events(self, peer: str, message: RemoteEvents) -> None:
        self.relay.on_events(peer, message)

    def _on_remote_ack(self, peer: str, message: RemoteAck) -> None:
        self.relay.on_ack(peer, message)

    def _on_remote_resume(self, peer: str, message: RemoteResume) -> None:
        self.relay.on_resume(peer, message)

    def _on_remote_cancel(self, peer: str, message: RemoteCancel) -> None:
        if self.relay.on_cancel(peer, message):
            self._cancel_local(message.request_id)

    _handlers: dict[type, Callable[[Cluster, str, Any], None]] = {
        NodeReport: _on_report,
        ClusterView: _on_view,
        StartShard: _on_start,
        StopShard: _on_stop,
        VoteRequest: _on_vote_request,
        VoteReply: _on_vote_reply,
        PlaceRequest: _on_place,
        PlaceReply: _on_place_reply,
        RemoteGenerate: _on_remote_generate,
        RemoteEvents: _on_remote_events,
        RemoteAck: _on_remote_ack,
        RemoteResume: _on_remote_resume,
        RemoteCancel: _on_remote_cancel,
        CancelRequest: _on_cancel_request,
        CancelReply: _on_cancel_reply,
    }

    # ---- the data path ----

    def ready_instances(self, model_id: str) -> list[InstanceStatus]:
        if self.view is None:
            return []
        return [
            s
            for s in self.view.instances
            if s.spec.model == model_id
            and s.state == "ready"
            and s.spec.entry_node in self.members
            and self._entry_alive(s.spec)
        ]

    def _entry_alive(self, spec: InstanceSpec) -> bool:
        """The view lags by a tick; for an instance whose entry is here, ask the
        runner itself, so a dead runner is noticed at once."""
        if spec.entry_node != self.node_id:
            return True
        worker = self.shards.worker(spec.instance_id)
        return worker is not None and worker.ready

    def choose_instance(self, model_id: str) -> InstanceSpec | None:
        """A ready instance of the model: one whose entry is this node first (no hop),
        then the one with the fewest requests this node has routed to it."""
        ready = self.ready_instances(model_id)
        if not ready:
            return None
        load: dict[str, int] = {}
        for route in self.relay.routes.values():
            load[route.entry_node] = load.get(route.entry_node, 0) + 1
        best = min(
            ready,
            key=lambda s: (
                s.spec.entry_node != self.node_id,
                load.get(s.spec.entry_node, 0),
                s.spec.instance_id,
            ),
        )
        return best.spec

    def dispatch(self, command: TextGeneration) -> InstanceSpec:
        """Send a registered request to an instance. Synchronous; raises
        RunnerUnavailable when no ready instance can take it."""
        spec = self.choose_instance(command.model)
        if spec is None:
            raise RunnerUnavailable(self.unavailable_reason(command.model))
        if spec.entry_node == self.node_id:
            worker = self.shards.worker(spec.instance_id)
            if worker is None:
                raise RunnerUnavailable(f"instance {spec.instance_id} is not running here")
            worker.submit(command)
        else:
            self.relay.dispatch(spec.entry_node, spec.instance_id, command)
        return spec

    def ready(self, model_id: str) -> bool:
        return bool(self.ready_instances(model_id))

    def local_worker(self, model_id: str) -> Worker | None:
        """This node's rank-0 runner of a ready instance of the model, else any
        local runner of it (for health and metrics)."""
        candidates = [s for s in self.shards.shards.values() if s.spec.model == model_id]
        candidates.sort(key=lambda s: (s.rank != 0, s.state != "ready", s.spec.instance_id))
        return candidates[0].worker if candidates else None

    def cancel(self, request_id: str, spec: InstanceSpec) -> None:
        if spec.entry_node == self.node_id:
            self._cancel_local(request_id)
        else:
            self.relay.cancel(request_id)

    def finished(self, request_id: str) -> None:
        self.relay.forget(request_id)

    def _cancel_local(self, request_id: str) -> None:
        for shard in self.shards.shards.values():
            if request_id in shard.worker.jobs:
                shard.worker.cancel(request_id)

    def unavailable_reason(self, model_id: str) -> str:
        if self.view is None:
            return "the cluster has no view yet (starting)"
        mine = [s for s in self.view.instances if s.spec.model == model_id]
        if not mine:
            return f"model {model_id} is not placed on any instance yet"
        states = ", ".join(
            f"{s.spec.instance_id}: {s.state}" + (f", {s.error}" if s.error else "") for s in mine
        )
        return f"no ready instance of {model_id} ({states})"

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
                }
                for s in self.shards.statuses()
            ],
            "relay": _plain(self.relay.stats),
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
        "shards": [_plain(s) for s in spec.shards],
    }
