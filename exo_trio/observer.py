"""What a node publishes about itself as it runs: the observer hook.

The simulator (sim/observe.py) and tests watch a node through this interface
instead of patching its methods or reading its private fields; production's
observer does nothing, like the fault points in seams.py. Every hook is called
synchronously, at the moment the thing happens, from the code that does it, and
must not raise, block or change what it is shown.

A live view of the cluster (a dashboard's event stream) is another observer: the
hooks cover what it would show (links, leadership, views and their instances,
shards and their runners, requests dispatched and failed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exo_trio.cluster_messages import ClusterMessage, ClusterView, InstanceSpec, NodeReport
    from exo_trio.types import GenerationFailed


class Observer:
    """Production's observer: every hook returns at once. Subclass and override
    the hooks you need."""

    # ---- node-to-node messages (peer_messages.py) ----

    def message_sent(self, peer: str, message: ClusterMessage) -> None:
        """A message left for `peer` (or for this node itself, handled at once)."""

    def message_received(self, peer: str, message: ClusterMessage) -> None:
        """A message from `peer` arrived, before it is handled."""

    def message_handled(self, peer: str, message: ClusterMessage) -> None:
        """A message from `peer` has been handled (its effects are in place)."""

    # ---- membership and leadership (cluster.py) ----

    def peer_up(self, peer: str) -> None:
        """A link to `peer` came (back) up."""

    def peer_down(self, peer: str, reason: str) -> None:
        """The link to `peer` went down (it may come back within the grace)."""

    def leader_changed(self, old: str, new: str, term: int) -> None:
        """This node's idea of the leader changed (`old` is "" at start-up)."""

    def view_changed(self, view: ClusterView) -> None:
        """This node adopted a new cluster view (a leader made it, or sent it)."""

    def stale_report(self, peer: str, report: NodeReport) -> None:
        """As leader, this node set aside a report sent before its current term."""

    # ---- shards (shard_manager.py) ----

    def shard_started(self, instance: InstanceSpec, rank: int) -> None:
        """This node started its rank of an instance (its runner is launching)."""

    def shard_stopped(self, instance_id: str, reason: str) -> None:
        """This node stopped its shard of an instance."""

    def runner_state(self, instance_id: str, state: str) -> None:
        """The runner of this node's shard of an instance changed state (worker.py's
        RunnerState: starting, loading, ready, restarting, stopped, failed)."""

    # ---- requests (api/, node.py, router.py, streams.py) ----

    def admission(self, admitted: bool, in_flight: int, limit: int) -> None:
        """A generation request was admitted, or refused at capacity (`in_flight`
        exchanges held of `limit`, before this one)."""

    def timed_out(self, request_id: str, kind: str) -> None:
        """A request passed one of its time limits ("ttft", "idle", "total") and ends
        with a timeout error now."""

    def request_ended(self, request_id: str, how: str) -> None:
        """A dispatched request's scope closed: "finished" or "failed" (its terminal
        event was read), or given up "before_first" or "mid_stream" (client gone,
        timed out, consumer failed: its runner work is cancelled)."""

    def send_timed_out(self, connection: object) -> None:
        """A client read nothing for --send-timeout: its `connection` (the stream
        the server accepted) is closed."""

    def dispatched(self, request_id: str, instance: InstanceSpec) -> None:
        """A registered request was handed to an instance (here, or through a peer)."""

    def request_failed(self, event: GenerationFailed) -> None:
        """A request owned by this node gets an error as its terminal event."""

    def first_chunk(self, request_id: str, reader_waiting: bool) -> None:
        """A request's first chunk reached its channel; `reader_waiting` says
        whether its consumer was already waiting on it (when not, the chunk
        arrived before anyone read: the window in which exo lost tokens)."""
