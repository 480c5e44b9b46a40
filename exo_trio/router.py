"""The request path through this node: where a registered request goes, and how its
events come back.

Down. `Node.open_generation` registers the request's channel, then calls
`dispatch`, which picks a ready instance of the model (one whose entry, rank 0, is
this node first, then the one this node sent the fewest requests to) and hands the
command to that entry: this node's runner (`Worker.submit`), or a peer
(`TokenRelay.dispatch`: a RemoteGenerate in the link's outbox). All synchronous, so
nothing runs between "registered" and "dispatched". A peer's RemoteGenerate arrives
in `on_message` and goes to this node's runner the same way.

Up. Every event a runner of this node sends comes to `deliver` (the Workers'
EventSink): a peer's request's events go back to it through the relay, this node's
own go to the streams registry. Events a peer relays back arrive in `on_message`
(RemoteEvents); the relay returns the ones to deliver, in order, exactly once, and
they go to the registry too. A lost peer's requests end here with an explicit
error (`peer_lost`).

The cluster (membership, leadership) tells the router what routing needs through
four calls, `peer_up`, `peer_down`, `peer_lost` and `view_changed`, and the router
never reads the cluster's state. Cancel by id across the cluster (POST /v1/cancel
on a node that does not own the request) is answered here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import trio

from exo_trio.cluster_messages import (
    CancelReply,
    CancelRequest,
    ClusterMessage,
    ClusterView,
    InstanceSpec,
    InstanceStatus,
    RemoteAck,
    RemoteCancel,
    RemoteEvents,
    RemoteGenerate,
    RemoteResume,
)
from exo_trio.node import CancelOutcome
from exo_trio.observer import Observer
from exo_trio.seams import FaultPoints
from exo_trio.shard_manager import ShardManager
from exo_trio.streams import StreamRegistry
from exo_trio.token_relay import ACK_EVERY, BUFFER_LIMIT, RelayStats, TokenRelay
from exo_trio.types import FailureKind, GenerationEvent, GenerationFailed, TextGeneration
from exo_trio.worker import RunnerUnavailable, Worker

log = logging.getLogger(__name__)

# How long POST /v1/cancel waits for the other nodes to say whether a request is
# theirs; a peer silent for that long leaves the answer "unknown" (a 503).
CANCEL_PATIENCE = 2.0

Send = Callable[[str, ClusterMessage], bool]


@dataclass
class _CancelCall:
    """A cancel asked of the peers: done at the first yes, or when all said no."""

    waiting: set[str]
    done: trio.Event = field(default_factory=trio.Event)
    cancelled: bool = False


@dataclass
class RouterStats:
    """What the router did; `statistics()` hands out a snapshot."""

    dispatched_here: int = 0  # to this node's runner
    dispatched_to_peer: int = 0  # to a peer's runner, through the relay
    refused: int = 0  # dispatch raised RunnerUnavailable (no ready instance, link down)
    remote_accepted: int = 0  # peers' requests submitted to this node's runner
    remote_refused: int = 0  # peers' requests this node's runner could not take
    cancels_here: int = 0  # runner work cancelled for a peer (RemoteCancel, lost owner)
    cancels_asked: int = 0  # cancels by id asked of the peers
    cancels_answered: int = 0  # peers' cancels by id answered
    peers_lost: int = 0
    failed_by_lost_peer: int = 0
    relay: RelayStats = field(default_factory=RelayStats)


class Router:
    def __init__(
        self,
        node_id: str,
        registry: StreamRegistry,
        shards: ShardManager,
        send: Send,
        new_id: Callable[[str], str],
        *,
        observer: Observer | None = None,
        faults: FaultPoints | None = None,
        ack_every: int = ACK_EVERY,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        self.node_id = node_id
        self.registry = registry
        self.shards = shards
        shards.events = self  # every runner of this node sends its events up here
        self.relay = TokenRelay(node_id, send, ack_every=ack_every, buffer_limit=buffer_limit)
        self._send = send
        self._new_id = new_id
        self._observer = observer or Observer()
        self._faults = faults or FaultPoints()
        # What the cluster told us: the peers linked now, the peers down but still
        # within their grace (they may come back with their requests), the view.
        self.linked: set[str] = set()
        self.down: set[str] = set()
        self.view: ClusterView | None = None
        self._cancel_calls: dict[str, _CancelCall] = {}
        self._cancel_owned: Callable[[str], bool] = lambda request_id: False
        self._stats = RouterStats()

    # ---- down: the Node dispatches (node.Dispatcher) ----

    def dispatch(self, command: TextGeneration) -> InstanceSpec:
        """Send a registered request to an instance. Synchronous; raises
        RunnerUnavailable when no ready instance can take it."""
        spec = self.choose_instance(command.model)
        try:
            if spec is None:
                raise RunnerUnavailable(self.unavailable_reason(command.model))
            if self._faults.fire("dispatch_refused", command.request_id):
                # As when the instance's runner died or its link dropped just now.
                raise RunnerUnavailable(f"instance {spec.instance_id} cannot take it now")
            if spec.entry_node == self.node_id:
                self._submit_here(spec.instance_id, command)
                self._stats.dispatched_here += 1
            else:
                self.relay.dispatch(spec.entry_node, spec.instance_id, command)
                self._stats.dispatched_to_peer += 1
        except RunnerUnavailable:
            self._stats.refused += 1
            raise
        self._observer.dispatched(command.request_id, spec)
        return spec

    def _submit_here(self, instance_id: str, command: TextGeneration) -> None:
        worker = self.shards.worker(instance_id)
        if worker is None:
            raise RunnerUnavailable(f"instance {instance_id} is not running here")
        worker.submit(command)

    def cancel(self, request_id: str, spec: InstanceSpec) -> None:
        """The request ended early (client gone, cancelled, timed out): stop its work."""
        if spec.entry_node == self.node_id:
            self._cancel_here(request_id)
        else:
            self.relay.cancel(request_id)

    def finished(self, request_id: str) -> None:
        self.relay.forget(request_id)

    def _cancel_here(self, request_id: str) -> None:
        for worker in self.shards.workers():
            if request_id in worker.jobs:
                worker.cancel(request_id)

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

    def ready_instances(self, model_id: str) -> list[InstanceStatus]:
        """The view's ready instances of the model whose entry node is reachable."""
        if self.view is None:
            return []
        return [
            s
            for s in self.view.instances
            if s.spec.model == model_id
            and s.state == "ready"
            and (s.spec.entry_node == self.node_id or s.spec.entry_node in self.linked)
            and self._entry_alive(s.spec)
        ]

    def _entry_alive(self, spec: InstanceSpec) -> bool:
        """The view lags by a tick; for an instance whose entry is here, ask the
        runner itself, so a dead runner is noticed at once."""
        if spec.entry_node != self.node_id:
            return True
        worker = self.shards.worker(spec.instance_id)
        return worker is not None and worker.ready

    def ready(self, model_id: str) -> bool:
        return bool(self.ready_instances(model_id))

    def placed_models(self) -> list[str]:
        """The models with a live instance in the cluster (placing to ready)."""
        if self.view is None:
            return []
        return sorted({s.spec.model for s in self.view.instances if s.state != "failed"})

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

    def local_worker(self, model_id: str) -> Worker | None:
        """This node's rank-0 runner of a ready instance of the model, else any
        local runner of it (for health and metrics)."""
        candidates = [s for s in self.shards.shards.values() if s.spec.model == model_id]
        candidates.sort(key=lambda s: (s.rank != 0, s.state != "ready", s.spec.instance_id))
        return candidates[0].worker if candidates else None

    # ---- up: every runner event of this node (worker.EventSink) ----

    def deliver(self, event: GenerationEvent) -> None:
        """A runner of this node sent an event: back to the peer that owns the
        request, or to this node's registry."""
        outcome = self.relay.relay_event(event)
        if outcome == "here":
            self._deliver_here(event)
        elif outcome == "overflow":
            self._cancel_here(event.request_id)

    def _deliver_here(self, event: GenerationEvent) -> None:
        if isinstance(event, GenerationFailed):
            self._observer.request_failed(event)
        self.registry.deliver(event)

    # ---- messages from peers (peer_messages.py hands them here) ----

    def on_message(self, peer: str, message: ClusterMessage) -> None:
        handler = self._handlers[type(message)]
        handler(self, peer, message)

    def _on_remote_generate(self, peer: str, message: RemoteGenerate) -> None:
        self.relay.accept(peer, message)  # first, so its first events find their way
        try:
            if self._faults.fire("remote_refused", message.command.request_id):
                # As when this node's runner died just now.
                raise RunnerUnavailable(f"instance {message.instance_id} cannot take it now")
            self._submit_here(message.instance_id, message.command)
            self._stats.remote_accepted += 1
        except RunnerUnavailable as exc:
            self._stats.remote_refused += 1
            self.deliver(
                GenerationFailed(
                    request_id=message.command.request_id,
                    kind="runner_unavailable",
                    message=str(exc),
                )
            )

    def _on_remote_events(self, peer: str, message: RemoteEvents) -> None:
        for event in self.relay.on_events(peer, message):
            self._deliver_here(event)

    def _on_remote_ack(self, peer: str, message: RemoteAck) -> None:
        self.relay.on_ack(peer, message)

    def _on_remote_resume(self, peer: str, message: RemoteResume) -> None:
        self.relay.on_resume(peer, message)

    def _on_remote_cancel(self, peer: str, message: RemoteCancel) -> None:
        if self.relay.on_cancel(peer, message):
            self._stats.cancels_here += 1
            self._cancel_here(message.request_id)

    # ---- peers' requests on this node's runners ----

    def peers_requests(self) -> list[str]:
        """Requests of other nodes running on this node's runners, not yet finished."""
        return [rid for rid, out in self.relay.outgoing.items() if not out.finished]

    def end_peers_requests(self, kind: FailureKind, message: str) -> int:
        """End every peer's request running here now (a shutdown): its owner gets a
        failure of this `kind`, its runner work is cancelled. Returns how many."""
        running = self.peers_requests()
        for request_id in running:
            self.deliver(GenerationFailed(request_id=request_id, kind=kind, message=message))
            self._cancel_here(request_id)
        return len(running)

    # ---- cancel by id, from any node (POST /v1/cancel) ----

    def accept_cancels(self, cancel: Callable[[str], bool]) -> None:
        """Peers' cancels of requests this node owns are applied by `cancel`."""
        self._cancel_owned = cancel

    async def cancel_elsewhere(
        self, request_id: str, patience: float = CANCEL_PATIENCE
    ) -> CancelOutcome:
        """Ask every peer to cancel `request_id` if it owns it (its client is
        connected there). "cancelled" as soon as one did; "absent" when every peer
        this node knows of said no; "unknown" when one could not be asked (its link
        is down) or did not answer in time."""
        call_id = self._new_id("cancel")
        # Peers down within their grace period still hold their requests.
        peers = sorted(self.linked | self.down)
        asked = {
            peer
            for peer in peers
            if self._send(peer, CancelRequest(call_id=call_id, request_id=request_id))
        }
        self._stats.cancels_asked += 1
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
        self._stats.cancels_answered += 1
        self._send(peer, CancelReply(call_id=request.call_id, cancelled=cancelled))

    def _on_cancel_reply(self, peer: str, reply: CancelReply) -> None:
        call = self._cancel_calls.get(reply.call_id)
        if call is None:
            return  # answered after the caller gave up
        call.waiting.discard(peer)
        call.cancelled = call.cancelled or reply.cancelled
        if call.cancelled or not call.waiting:
            call.done.set()

    _handlers: dict[type, Callable[[Router, str, Any], None]] = {
        RemoteGenerate: _on_remote_generate,
        RemoteEvents: _on_remote_events,
        RemoteAck: _on_remote_ack,
        RemoteResume: _on_remote_resume,
        RemoteCancel: _on_remote_cancel,
        CancelRequest: _on_cancel_request,
        CancelReply: _on_cancel_reply,
    }

    # ---- what the cluster tells the router (cluster.Routing) ----

    def peer_up(self, peer: str) -> None:
        """A link came (back) up. Called before anything else can be sent on it."""
        self.linked.add(peer)
        self.down.discard(peer)
        self.relay.on_peer_up(peer)

    def peer_down(self, peer: str) -> None:
        """A link went down; its requests wait for it within the grace."""
        self.linked.discard(peer)
        self.down.add(peer)

    def peer_lost(self, peer: str) -> None:
        """A peer down past the grace is gone for good: the requests routed to it
        end with an explicit error, and its requests here stop."""
        self.down.discard(peer)
        self._stats.peers_lost += 1
        failed = self.relay.fail_routes(peer, f"node {peer} was lost")
        for event in failed:
            self._deliver_here(event)
        for request_id in self.relay.drop_origin(peer):
            self._stats.cancels_here += 1
            self._cancel_here(request_id)
        if failed:
            self._stats.failed_by_lost_peer += len(failed)
            log.warning("node %s lost: failed %d request(s)", peer, len(failed))

    def view_changed(self, view: ClusterView) -> None:
        self.view = view

    # ---- statistics ----

    def statistics(self) -> RouterStats:
        return replace(self._stats, relay=self.relay.statistics())

    def summary(self) -> dict[str, Any]:
        """The relay's counters, for GET /state."""
        stats = asdict(self.relay.statistics())
        return {k: v for k, v in stats.items() if k not in ("routes", "outgoing")}


ROUTER_MESSAGES: frozenset[type] = frozenset(Router._handlers)
