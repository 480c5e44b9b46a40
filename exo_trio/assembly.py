"""One node, assembled from its effects: the one place a node's parts are wired.

The daemon (daemon.py), the simulator (sim/world.py) and the fuzzers' in-process
node (fuzz/inproc.py) all build their nodes with `build_node`, so the wiring they
run is the wiring that ships. They differ only in what they hand in:

- `NodeSetup`: who the node is and how it is configured (id, models, settings);
- `NodeEffects`: what it does to the world, each a seam: the clock, ids, fault
  points and the observer (`Seams`); the network (the links' listener and
  connector, nonces, jitter); how a shard's runner process is started; where the
  API's HTTP connections come from; the machine (free memory, ports, the disk the
  node's vote is kept on).

The parts, as a request meets them (docs/architecture.md has the calls):

    app (api/) -> Node -> StreamRegistry (register) -> Router (dispatch)
        -> this node's Worker -> runner process
        -> or TokenRelay -> PeerMessages -> PeerLinks -> the peer's Router -> ...
    runner -> Worker -> Router (deliver) -> StreamRegistry -> Node -> app
        (a peer's request: Router -> TokenRelay -> PeerMessages -> PeerLinks ->
         the owner's Router -> its StreamRegistry)

Beside the request path, the Cluster (membership and leadership) hears the links
come and go, commands the ShardManager, and tells the Router what routing needs.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from quart_trio import QuartTrio

from exo_trio.api.app import create_app
from exo_trio.api.serving import Listen, serve, tcp_listeners
from exo_trio.api.settings import ApiSettings
from exo_trio.cluster import Cluster, ClusterSettings
from exo_trio.cluster_messages import ClusterMessage, ModelInfo
from exo_trio.cluster_state import Vote
from exo_trio.model_catalog import ModelCatalog
from exo_trio.net.links import (
    Connector,
    ListenerFactory,
    PeerInfo,
    PeerLinks,
    open_tcp_listeners,
    open_tcp_stream,
)
from exo_trio.net.wire import AdvertisedAddress
from exo_trio.node import Node, ServedModel
from exo_trio.node_facts import node_facts
from exo_trio.peer_messages import PeerMessages
from exo_trio.router import Router
from exo_trio.seams import Seams
from exo_trio.shard_manager import LauncherFactory, ShardManager
from exo_trio.streams import StreamRegistry
from exo_trio.token_relay import ACK_EVERY, BUFFER_LIMIT


@dataclass
class LinkSetup:
    """The links to the other nodes (net/links.py)."""

    cluster_id: str = "exo-trio"
    secret: bytes | None = None
    listen_host: str | None = None  # None: loopback without a secret, else all
    listen_port: int = 0
    peers: Sequence[tuple[str, int]] = ()
    # The addresses to advertise (None: every interface's, as the daemon does).
    advertise: Sequence[AdvertisedAddress] | None = None
    allow_weak_secret: bool = False  # a secret shorter than net/auth.py asks for


@dataclass
class NodeSetup:
    """Who the node is and how it is configured."""

    node_id: str
    host: str  # where peers' runners reach this node's (mx.distributed)
    # The models the API serves from the start (zero or more); others come and go
    # as they are placed at run time (through the catalog).
    served: Sequence[ServedModel]
    models: dict[str, ModelInfo]  # every model this node has on disk
    serve: tuple[str, ...]  # the ones it offers to serve
    api: ApiSettings = field(default_factory=ApiSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    links: LinkSetup = field(default_factory=LinkSetup)
    http: HypercornConfig = field(default_factory=HypercornConfig)
    # How soon a single-rank runner that died is started again (doubling to 10 s).
    restart_backoff: float = 0.5
    # The token relay: acknowledge every this many events; buffer at most this many
    # unacknowledged events per request (token_relay.py).
    ack_every: int = ACK_EVERY
    relay_buffer: int = BUFFER_LIMIT
    # The model store, downloads, the files of a shard and the tokenizers of models
    # placed at run time (None: only `served`; the model endpoints answer 404).
    catalog: ModelCatalog | None = None


@dataclass
class NodeEffects:
    """What the node does to the world, each through a seam the simulator replaces."""

    launcher_for: LauncherFactory  # starts a shard's runner (a process, or a fake)
    seams: Seams = field(default_factory=Seams)  # clock, ids, faults, observer
    listen_api: Listen = tcp_listeners  # the API's listeners (TCP, or in-memory)
    link_connector: Connector = open_tcp_stream
    link_listener: ListenerFactory = open_tcp_listeners
    token_bytes: Callable[[int], bytes] = secrets.token_bytes  # nonces, incarnation
    rng: random.Random | None = None  # reconnect jitter
    memory_free: Callable[[], int] = lambda: 0
    memory_total: Callable[[], int] = lambda: 0  # for people (node_facts.py)
    free_ports: Callable[[], tuple[int, ...]] = lambda: ()
    # The vote this node granted last (its previous life's), and how to keep a new one.
    remembered_vote: Vote | None = None
    remember_vote: Callable[[Vote], None] | None = None


@dataclass
class AssembledNode:
    """A node's parts, built by `build_node`; `run` runs them."""

    setup: NodeSetup
    effects: NodeEffects
    registry: StreamRegistry
    shards: ShardManager
    messages: PeerMessages
    router: Router
    cluster: Cluster
    links: PeerLinks[ClusterMessage]
    node: Node
    app: QuartTrio

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the node until cancelled: its shards, its links, the cluster loop and
        the API. Reports the API's URLs once it serves; on the way out the API
        stops first, then everything else (runners stopped, links closed)."""
        async with trio.open_nursery() as nursery:
            catalog = self.setup.catalog
            if catalog is not None:
                await nursery.start(catalog.downloads.run)
            await nursery.start(self.shards.run)
            await nursery.start(self.links.run)
            await nursery.start(self.cluster.run)
            if catalog is not None:
                instances = self.cluster.live_instances
                await nursery.start(catalog.run, lambda: [s.spec for s in instances()])
            api = partial(
                serve,
                self.app,
                self.setup.http,
                listen=self.effects.listen_api,
                observer=self.effects.seams.observer,
            )
            task_status.started(await nursery.start(api))


def build_node(setup: NodeSetup, effects: NodeEffects) -> AssembledNode:
    seams = effects.seams
    observer = seams.observer
    node_id = setup.node_id
    registry = StreamRegistry(observer)
    messages = PeerMessages(node_id, observer, seams.faults)
    catalog = setup.catalog
    shards = ShardManager(
        effects.launcher_for,
        observer=observer,
        restart_backoff=setup.restart_backoff,
        # A shard gets the model's files it lacks (a hub model) before its runner,
        # and a rank of a split model starts it once every rank has its files.
        prepare=catalog.fetch_shard if catalog is not None else None,
        group_fetched=lambda instance_id: cluster.instance_fetched(instance_id),
    )
    # The Router takes the runners' events (it sets itself as the shards' sink).
    router = Router(
        node_id,
        registry,
        shards,
        messages.send,
        seams.new_id,
        observer=observer,
        faults=seams.faults,
        ack_every=setup.ack_every,
        buffer_limit=setup.relay_buffer,
    )
    cluster = Cluster(
        node_id=node_id,
        host=setup.host,
        models=setup.models,
        serve=setup.serve,
        shards=shards,
        router=router,
        send=messages.send,
        memory_free=effects.memory_free,
        free_ports=effects.free_ports,
        new_id=seams.new_id,
        settings=setup.cluster,
        remembered_vote=effects.remembered_vote,
        remember_vote=effects.remember_vote,
        observer=observer,
        # What the node tells about itself for people (its links are made below).
        facts=lambda: node_facts(links, effects.memory_total()),
    )

    def peer_up(info: PeerInfo) -> None:
        cluster.on_peer_up(info.node_id)

    link = setup.links
    links: PeerLinks[ClusterMessage] = PeerLinks(
        node_id,
        link.cluster_id,
        link.secret,
        ClusterMessage,
        messages.receive,
        peer_up,
        cluster.on_peer_down,
        listen_host=link.listen_host,
        listen_port=link.listen_port,
        peers=link.peers,
        advertise=link.advertise,
        allow_weak_secret=link.allow_weak_secret,
        connector=effects.link_connector,
        listener=effects.link_listener,
        token_bytes=effects.token_bytes,
        rng=effects.rng,
    )
    messages.attach(links=links, router=router, cluster=cluster)
    node = Node(
        served=setup.served,
        registry=registry,
        seams=seams,
        dispatcher=router,
        catalog=catalog,
    )
    app = create_app(node, setup.api, cluster)
    return AssembledNode(
        setup, effects, registry, shards, messages, router, cluster, links, node, app
    )
