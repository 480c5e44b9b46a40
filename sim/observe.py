"""The simulator's observer of one node (exo_trio/observer.py): what the node
publishes goes to the watch (sim/watch.py), the trace and the coverage counters.

Nothing here changes what the node does: every hook only looks. The one action
taken from a hook, a delayed stale shard command injected when a node adopts a
newer term, happens after the message that raised the term was handled, through
the node's own entry for messages (`PeerMessages.receive`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exo_trio.cluster_messages import ClusterMessage, InstanceSpec, StartShard
from exo_trio.observer import Observer
from exo_trio.types import GenerationFailed

if TYPE_CHECKING:
    from sim.world import SimNode, World


class SimObserver(Observer):
    def __init__(self, world: World, node: SimNode) -> None:
        self.world = world
        self.node = node
        # Per message being handled (a stale command may be injected while one is):
        # the node's term and live shards before it, to judge its effects after.
        self._before: list[tuple[int, dict[str, Any]]] = []

    # ---- messages ----

    def message_sent(self, peer: str, message: ClusterMessage) -> None:
        self.world.watch.sent(self.node, peer, message)
        if isinstance(message, StartShard):
            self.world.specs.setdefault(message.instance.instance_id, message.instance)

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
        if event.kind == "peer_lost":
            self.world.watch.lost_peer(self.node, event.request_id)

    def first_chunk(self, request_id: str, reader_waiting: bool) -> None:
        if not reader_waiting:
            self.world.coverage["chunk_before_consumer_read"] += 1
