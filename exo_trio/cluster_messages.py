"""Messages between nodes (carried by exo_trio.net links as msgpack).

Control messages (reports, the leader's view, shard start/stop) carry the sender's
term so that a stale leader's decisions can be recognised and rejected; a leader
asks each member to grant it its term (VoteRequest / VoteReply) before it sends
that member any of them. Data
messages (remote generation, its events, acks, cancels) go point to point between
the node that owns a request and the node hosting the instance's rank 0; they never
pass through the leader.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from exo_trio.net.wire import AdvertisedAddress
from exo_trio.types import GenerationEvent, TextGeneration

# "downloading": the shard's node is fetching the weight files its layers need
# (a hub model it does not have) before it starts the runner; "fetched": it has
# them and waits for the other ranks to have theirs (a rank's runner gives up
# joining its group after a minute, so no rank starts while another downloads).
ShardState = Literal["downloading", "fetched", "starting", "loading", "ready", "failed", "stopped"]
InstanceState = Literal["placing", "downloading", "loading", "ready", "failed"]


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    size_bytes: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    supports_tensor: bool
    context_length: int
    # A hub model: any node can fetch it (the files its layers need) at this commit.
    repo: str | None = None
    commit: str | None = None


class ShardSpec(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    rank: int
    start_layer: int
    end_layer: int
    host: str  # where the other ranks reach this rank's mx.distributed endpoint
    port: int


class InstanceSpec(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    model: str
    sharding: Literal["pipeline", "tensor"]
    backend: Literal["ring", "jaccl"]
    shards: tuple[ShardSpec, ...]
    auto: bool  # placed by the leader on its own (re-placed after failures)
    # The model as the leader placed it: its size, layers, and for a hub model where
    # a shard's node fetches the files it lacks. (None from older leaders.)
    info: ModelInfo | None = None

    @property
    def world_size(self) -> int:
        return len(self.shards)

    @property
    def entry_node(self) -> str:
        """The node hosting rank 0: the one that takes this instance's requests."""
        return self.shards[0].node_id


class ShardStatus(msgspec.Struct, frozen=True, kw_only=True):
    instance: InstanceSpec
    rank: int
    state: ShardState
    error: str | None = None
    active_requests: int = 0
    # While downloading: bytes on disk and to fetch, of the files this rank needs.
    download_completed: int = 0
    download_total: int = 0
    # Tokens this rank's runner generated per second lately (rank 0: the instance's).
    tokens_per_second: float = 0.0
    # Failed for good: its runner could not load the model (worker.py's give-up
    # rule). The leader neither tears it down nor places the model again.
    gave_up: bool = False


class LinkReport(msgspec.Struct, frozen=True, kw_only=True):
    """A node's link to a peer, as that node sees it."""

    peer: str
    host: str  # the peer's end of the link
    kind: str  # net/interfaces.classify: thunderbolt, link-local, private, public, loopback
    rtt: float | None = None  # smoothed round trip, seconds (net/session.py's probes)


class NodeFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a node says about itself for people to look at (/state, the dashboard's
    event stream); no decision reads it."""

    memory_total: int = 0
    addresses: tuple[AdvertisedAddress, ...] = ()
    links: tuple[LinkReport, ...] = ()


class RunnerSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One shard's runner on a node, for the view: its health and its load."""

    instance_id: str
    rank: int
    state: ShardState
    active_requests: int = 0
    error: str | None = None


class NodeReport(msgspec.Struct, frozen=True, kw_only=True, tag="report"):
    """A node's soft state, sent to the leader on change and periodically."""

    node_id: str
    term: int
    memory_free: int
    models: tuple[ModelInfo, ...]
    serve: tuple[str, ...]  # models this node was started to serve (auto placement)
    shards: tuple[ShardStatus, ...]
    host: str  # the address peers reach this node at
    free_ports: tuple[int, ...]
    facts: NodeFacts = msgspec.field(default_factory=NodeFacts)


class NodeSummary(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    memory_free: int
    models: tuple[str, ...]
    host: str
    facts: NodeFacts = msgspec.field(default_factory=NodeFacts)
    runners: tuple[RunnerSummary, ...] = ()


class InstanceStatus(msgspec.Struct, frozen=True, kw_only=True):
    spec: InstanceSpec
    state: InstanceState
    error: str | None = None
    # Summed over the ranks' reports (for /state, /v1/models and `exo-trio ps`).
    download_completed: int = 0
    download_total: int = 0
    tokens_per_second: float = 0.0
    gave_up: bool = False  # a rank gave up loading: failed, kept, not placed again
    # Every rank reported and none is downloading: the ranks may start their runners.
    fetched: bool = False


class ClusterView(msgspec.Struct, frozen=True, kw_only=True, tag="view"):
    """The leader's view, broadcast to every node."""

    term: int
    leader: str
    nodes: tuple[NodeSummary, ...]
    instances: tuple[InstanceStatus, ...]


class StartShard(msgspec.Struct, frozen=True, kw_only=True, tag="start_shard"):
    term: int
    instance: InstanceSpec
    rank: int


class StopShard(msgspec.Struct, frozen=True, kw_only=True, tag="stop_shard"):
    term: int
    instance_id: str
    reason: str


class VoteRequest(msgspec.Struct, frozen=True, kw_only=True, tag="vote_request"):
    """A leader asks a member to grant it `term` (the sender is the link's peer)."""

    term: int


class VoteReply(msgspec.Struct, frozen=True, kw_only=True, tag="vote_reply"):
    """The answer to a VoteRequest for `term`: granted, or refused because the
    member already granted that term or a higher one; `known` is the highest term
    the member knows, which a refused leader goes above."""

    term: int
    granted: bool
    known: int


class PlaceRequest(msgspec.Struct, frozen=True, kw_only=True, tag="place"):
    """Ask the leader to place (or delete) an instance; answered with PlaceReply."""

    call_id: str
    model: str = ""
    sharding: Literal["pipeline", "tensor"] = "pipeline"
    nodes: tuple[str, ...] | None = None
    min_nodes: int = 1
    delete: str | None = None  # an instance id to delete instead
    # The model, when the asking node resolved it (a hub model no node has yet).
    info: ModelInfo | None = None


class PlaceReply(msgspec.Struct, frozen=True, kw_only=True, tag="place_reply"):
    call_id: str
    ok: bool
    status: int
    message: str
    instance: InstanceSpec | None = None


class RemoteGenerate(msgspec.Struct, frozen=True, kw_only=True, tag="remote_generate"):
    """From the owning node to the instance's entry node."""

    origin: str
    instance_id: str
    command: TextGeneration


class RemoteEvents(msgspec.Struct, frozen=True, kw_only=True, tag="remote_events"):
    """Events of one request, in sequence order, from the entry node to the owner."""

    request_id: str
    events: tuple[GenerationEvent, ...]


class RemoteAck(msgspec.Struct, frozen=True, kw_only=True, tag="remote_ack"):
    """The owner has everything up to (not including) event number `upto`."""

    request_id: str
    upto: int


class RemoteCancel(msgspec.Struct, frozen=True, kw_only=True, tag="remote_cancel"):
    request_id: str


class RemoteResume(msgspec.Struct, frozen=True, kw_only=True, tag="remote_resume"):
    """After a reconnect: the owner asks for events from `next_event` on."""

    request_id: str
    next_event: int


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, tag="cancel_request"):
    """POST /v1/cancel reached a node that does not own the request: it asks every
    peer to cancel it if theirs; each answers with CancelReply."""

    call_id: str
    request_id: str


class CancelReply(msgspec.Struct, frozen=True, kw_only=True, tag="cancel_reply"):
    call_id: str
    cancelled: bool  # the request was in flight there and is cancelled now


ClusterMessage = (
    NodeReport
    | ClusterView
    | StartShard
    | StopShard
    | VoteRequest
    | VoteReply
    | PlaceRequest
    | PlaceReply
    | RemoteGenerate
    | RemoteEvents
    | RemoteAck
    | RemoteCancel
    | RemoteResume
    | CancelRequest
    | CancelReply
)
