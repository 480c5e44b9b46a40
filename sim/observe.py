"""The simulator's observer of one node (exo_trio/observer.py): what the node
publishes goes to the watch (sim/watch.py), the trace and the coverage counters.

Nothing here changes what the node does: every hook only looks. The one action
taken from a hook, a delayed stale shard command injected when a node adopts a
newer term, happens after the message that raised the term was handled, through
the node's own entry for messages (`PeerMessages.receive`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from exo_trio.cluster_messages import (
    ClusterMessage,
    InstanceSpec,
    NodeReport,
    StartShard,
    VoteRequest,
)
from exo_trio.observer import Observer
from exo_trio.types import GenerationFailed

if TYPE_CHECKING:
    from sim.world import SimNode, World

# A link outbox holding this many messages counts as backed up.
BACKLOG = 16


class SimObserver(Observer):
    def __init__(self, world: World, node: SimNode) -> None:
        self.world = world
        self.node = node
        # Per message being handled (a stale command may be injected while one is):
        # the node's term and live shards before it, to judge its effects after.
        self._before: list[tuple[int, dict[str, Any]]] = []

    # ---- messages ----

    def message_sent(self, peer: str, message: ClusterMessage) -> None:
        world = self.world
        world.watch.sent(self.node, peer, message)
        if isinstance(message, StartShard):
            world.specs.setdefault(message.instance.instance_id, message.instance)
        elif isinstance(message, VoteRequest):
            world.maybe_stale_report(self.node, peer, message.term)
        if peer != self.node.node_id and self.node.links.backlog(peer) >= BACKLOG:
            world.coverage[f"outbox_backlog_{BACKLOG}"] += 1

    def message_received(self, peer: str, message: ClusterMessage) -> None:
        node = self.node
        self.world.watch.received(node, peer, message)
        live = {i: shard for i, shard in node.shards.shards.items() if not shard.stopped}
        self._before.append((node.cluster.term, live))

    def message_handled(self, peer: str, message: ClusterMessage) -> None:
        node = self.node
        term, live = self._before.pop()
        self.world.watch.fence(node, peer, message, term, live)
        if node.cluster.term > term:
            self.world.maybe_stale_command(node)

    # ---- membership and leadership ----

    def peer_up(self, peer: str) -> None:
        self.world.trace.add("link-up", self.node.node_id, peer)

    def peer_down(self, peer: str, reason: str) -> None:
        self.world.trace.add("link-down", self.node.node_id, peer, reason[:40])
        self.world.watch.link_down(self.node, peer, reason)

    def leader_changed(self, old: str, new: str, term: int) -> None:
        if old:
            self.world.leader_changed(self.node, old, new)

    # ---- shards and requests ----

    def shard_stopped(self, instance_id: str, reason: str) -> None:
        self.world.watch.instance_stopped(instance_id)

    def dispatched(self, request_id: str, instance: InstanceSpec) -> None:
        self.world.watch.dispatched(self.node, request_id, instance)

    def request_failed(self, event: GenerationFailed) -> None:
        watch = self.world.watch
        watch.failed(self.node, event)
        if event.kind == "peer_lost":
            watch.lost_peer(self.node, event.request_id)

    def first_chunk(self, request_id: str, reader_waiting: bool) -> None:
        if not reader_waiting:
            self.world.coverage["chunk_before_consumer_read"] += 1

    def admission(self, admitted: bool, in_flight: int, limit: int) -> None:
        self.world.coverage["admission_admitted" if admitted else "admission_refused"] += 1
        if not admitted:
            now = trio.current_time()
            self.world.watch.refusals.append((self.node.index, now, in_flight, limit))

    def timed_out(self, request_id: str, kind: str) -> None:
        self.world.coverage[f"timeout_{kind}"] += 1
        # Events already waiting in the request's channel when the node gave up on
        # it: a time limit on the runner's progress must not fire then.
        waiting = self.node.registry.pending(request_id)
        self.world.watch.timeouts[request_id] = (kind, trio.current_time(), waiting)

    def request_ended(self, request_id: str, how: str) -> None:
        self.world.coverage[f"request_ended_{how}"] += 1
        self.world.watch.ended[request_id] = (how, trio.current_time())

    def send_timed_out(self, connection: object) -> None:
        self.world.coverage["send_timeout"] += 1
        self.world.watch.send_timeouts[id(connection)] = trio.current_time()

    def stale_report(self, peer: str, report: NodeReport) -> None:
        self.world.coverage["stale_report_set_aside"] += 1
