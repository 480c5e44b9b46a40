"""Every message between this node and its peers passes here, both ways.

Incoming (PeerLinks' on_message): the request path's messages (RemoteGenerate,
RemoteEvents, RemoteAck, RemoteResume, RemoteCancel, CancelRequest, CancelReply)
go to the Router, everything else (reports, votes, views, shard commands,
placement calls) to the Cluster. Outgoing: onto the link to the peer (its outbox:
`send` never blocks), or, for a message a node sends itself (the leader commanding
its own shards), straight to its handler. The observer sees every message sent,
and every message received before and after it is handled.
"""

from __future__ import annotations

from typing import Any, Protocol

from exo_trio.cluster_messages import ClusterMessage
from exo_trio.observer import Observer
from exo_trio.router import ROUTER_MESSAGES
from exo_trio.seams import FaultPoints


class Handler(Protocol):
    def on_message(self, peer: str, message: Any) -> None: ...


class Outbox(Protocol):
    """The links (net/links.py PeerLinks): queue a message for a peer; False when
    there is no link to it."""

    def send(self, peer_id: str, message: Any) -> bool: ...


class PeerMessages:
    def __init__(
        self, node_id: str, observer: Observer | None = None, faults: FaultPoints | None = None
    ) -> None:
        self.node_id = node_id
        self._observer = observer or Observer()
        self._faults = faults or FaultPoints()
        self._links: Outbox | None = None
        self._router: Handler | None = None
        self._cluster: Handler | None = None

    def attach(self, *, links: Outbox, router: Handler, cluster: Handler) -> None:
        self._links = links
        self._router = router
        self._cluster = cluster

    def send(self, peer: str, message: ClusterMessage) -> bool:
        """Queue `message` for `peer`. False when no link to it is up."""
        self._observer.message_sent(peer, message)
        if peer == self.node_id:
            self._handle(peer, message)
            return True
        sent = self._links is not None and self._links.send(peer, message)
        if sent:
            # Where the simulator may cut the link right after (the message lost
            # with it, as a dying TCP connection loses what it had not delivered).
            self._faults.fire("after_send", peer, message)
        return sent

    def receive(self, peer: str, message: ClusterMessage) -> None:
        """A message from a peer (PeerLinks' on_message; the simulator injects a
        delayed one here too)."""
        self._observer.message_received(peer, message)
        self._handle(peer, message)
        self._observer.message_handled(peer, message)

    def _handle(self, peer: str, message: ClusterMessage) -> None:
        target = self._router if type(message) in ROUTER_MESSAGES else self._cluster
        assert target is not None, "PeerMessages used before attach()"
        target.on_message(peer, message)
