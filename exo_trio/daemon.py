"""Running one node on this machine: its model, its data directory, its real effects.

The node itself is assembled by assembly.build_node (as the simulator and the
fuzzers assemble theirs); this module gives it the real world: the model on disk,
runner processes, TCP sockets, the vote on disk, signals.

Every node runs the cluster code, alone or not: on its own it is the leader of a
one-node cluster and places its model on itself, so the single-node path and the
multi-node path are the same code.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig

from exo_trio import console
from exo_trio.affinity import CoreSplit
from exo_trio.api.auth import check_exposure
from exo_trio.api.settings import ApiSettings
from exo_trio.assembly import AssembledNode, LinkSetup, NodeEffects, NodeSetup, build_node
from exo_trio.cluster import Cluster, ClusterSettings
from exo_trio.cluster_state import Vote
from exo_trio.demo_model import DEMO_MODEL_ID, ensure_demo_model
from exo_trio.downloads import Downloads, always_fits
from exo_trio.hub_download import HubClient
from exo_trio.hub_plan import HubRef, parse_hub_ref
from exo_trio.model_catalog import ModelCatalog
from exo_trio.model_info import describe_model_dir, model_info
from exo_trio.model_store import ModelStore, name_for_path
from exo_trio.net.discovery import Discovery
from exo_trio.net.interfaces import WILDCARD_HOSTS, interface_addresses, is_loopback
from exo_trio.node import ModelCard
from exo_trio.placement import memory_shortfall
from exo_trio.prompts import HFPromptEncoder, context_length
from exo_trio.runner_launch import shard_launcher_factory
from exo_trio.seams import Seams
from exo_trio.shutdown import graceful_stop
from exo_trio.startup import default_data_dir
from exo_trio.system import memory_available
from exo_trio.terminal import ProgressBar

log = logging.getLogger("exo_trio")


@dataclass
class NodeConfig:
    # A model directory, or a hub model id `org/name[@revision]` (fetched first).
    model_path: Path | None = None
    # The name to serve the model under (default: its hub id or directory name).
    served_model_name: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 52415
    data_dir: Path = field(default_factory=default_data_dir)
    max_batch: int = 16
    api: ApiSettings = field(default_factory=ApiSettings)
    # Serve a non-loopback address without an API key (see api/auth.py).
    insecure_no_api_key: bool = False
    node_id: str | None = None
    listen_host: str | None = None  # default: loopback without a secret, else all
    listen_port: int = 52416
    peers: tuple[tuple[str, int], ...] = ()
    cluster_id: str = "exo-trio"
    cluster_secret: bytes | None = None
    discovery: bool = True
    auto_place: bool = True
    advertise_host: str | None = None
    settle: float = 10.0
    # How the node split the cores, if it pinned itself (affinity.py).
    cores: CoreSplit | None = None
    # Accept a cluster secret under auth.MIN_SECRET_BYTES (--insecure-weak-secret).
    allow_weak_secret: bool = False
    # On SIGTERM/SIGINT: how long in-flight requests may take to finish (shutdown.py).
    drain_timeout: float = 5.0


async def resolve_model(config: NodeConfig) -> tuple[str, Path]:
    """The model to serve and its name: the given directory, the given hub model
    (downloaded into the store first, with a progress bar), or the demo model."""
    if config.model_path is None:
        log.info("no --model given: serving the built-in demo model")
        return config.served_model_name or DEMO_MODEL_ID, ensure_demo_model(config.data_dir)
    text = str(config.model_path)
    path = config.model_path.expanduser()
    if path.is_dir():
        path = path.resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"exo-trio: {path} is not an MLX model directory (no config.json)")
        return config.served_model_name or name_for_path(path), path
    ref = parse_hub_ref(text)
    if ref is None:
        raise SystemExit(
            f"exo-trio: --model {text}: no such directory, and not a hub model id "
            "(org/name or org/name@revision)"
        )
    return config.served_model_name or ref.name, await fetch_at_start(config, ref)


async def fetch_at_start(config: NodeConfig, ref: HubRef) -> Path:
    """Download a hub model before the node starts serving it. Alone (no --peer)
    the node refuses a model its memory cannot hold, before fetching its weights;
    with peers the cluster's placement judges (it may split the model)."""
    store = ModelStore(config.data_dir)
    downloads = Downloads(HubClient(store.hub_cache))
    fits = always_fits
    if not config.peers:
        fits = lambda name, size: memory_shortfall(name, size, [memory_available()])  # noqa: E731
    log.info("fetching %s into %s", ref.name, store.hub_cache)
    bar = ProgressBar(f"pulling {ref.name}")
    async with trio.open_nursery() as nursery:
        await nursery.start(downloads.run)
        download = downloads.start(ref, fits)
        try:
            while not download.done.is_set():
                bar.show(download.progress.completed, download.progress.total)
                with trio.move_on_after(0.2):
                    await download.done.wait()
            bar.show(download.progress.completed, download.progress.total)
        finally:
            bar.close()
            downloads.leave(download)
            nursery.cancel_scope.cancel()
    if download.error is not None or download.path is None:
        raise SystemExit(f"exo-trio: cannot serve {ref.name}: {download.error}")
    return download.path


def discovers(config: NodeConfig) -> bool:
    """Whether the node looks for peers on the LAN (never without a secret)."""
    return config.discovery and config.cluster_secret is not None


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_node_id(config: NodeConfig) -> str:
    """A stable id per data directory (so a restarted node is the same node)."""
    if config.node_id:
        return config.node_id
    path = config.data_dir / "node_id"
    if path.is_file():
        return path.read_text().strip()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    node_id = f"node-{uuid.uuid4().hex[:12]}"
    path.write_text(node_id + "\n")
    return node_id


def load_vote(data_dir: Path) -> Vote | None:
    """The term this node granted last, and to whom, as its previous life wrote it."""
    path = data_dir / "vote.json"
    try:
        raw = json.loads(path.read_text())
        return Vote(term=int(raw["term"]), leader=str(raw["leader"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def save_vote(data_dir: Path, vote: Vote) -> None:
    """Write the grant down before it is sent (rare: once per leader change). A
    small synchronous write, replaced atomically so a crash leaves the old or the
    new grant, never half of one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / "vote.json.tmp"
    tmp.write_text(json.dumps({"term": vote.term, "leader": vote.leader}) + "\n")
    os.replace(tmp, data_dir / "vote.json")


def reachable_host(config: NodeConfig, listen_host: str) -> str:
    """The address other nodes' runners connect to for this node's mx.distributed
    endpoint: --advertise-host, else the listen address, else (listening on every
    interface) the first non-loopback IPv4 address (an IPv6 link-local one would
    need the peer's own scope)."""
    if config.advertise_host:
        return config.advertise_host
    if listen_host not in WILDCARD_HOSTS:
        return listen_host
    for _, address in interface_addresses():
        if not is_loopback(address) and ":" not in address:
            return address
    return "127.0.0.1"


def free_ports(host: str, count: int = 4) -> tuple[int, ...]:
    """Ports free right now on `host`, offered to the leader for mx.distributed."""
    ports = []
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return tuple(ports)


def cluster_memory(cluster: Cluster) -> list[int]:
    """Every node's free memory as the leader last reported it; this node's own
    now (and alone, before the first view)."""
    mine = memory_available()
    view = cluster.view
    if view is None:
        return [mine]
    return [mine, *(n.memory_free for n in view.nodes if n.node_id != cluster.node_id)]


async def run_node(config: NodeConfig) -> None:
    check_exposure(config.api_host, config.api, config.insecure_no_api_key)
    model_id, model_path = await resolve_model(config)
    node_id = load_node_id(config)
    log.info("node %s; model %s from %s", node_id, model_id, model_path)
    log.info("loading tokenizer")
    encoder = HFPromptEncoder(model_path)
    seams = Seams()
    facts = describe_model_dir(model_path)
    card = ModelCard(
        id=model_id,
        context_length=context_length(model_path),
        created=int(seams.wall_clock()),
        architecture=facts.architecture,
        size_bytes=facts.size_bytes,
        digest=facts.digest,
        vocab_size=facts.vocab_size,
    )
    listen_host = config.listen_host or ("0.0.0.0" if config.cluster_secret else "127.0.0.1")
    host = reachable_host(config, listen_host)
    store = ModelStore(config.data_dir)
    downloads = Downloads(HubClient(store.hub_cache))
    parts: AssembledNode
    catalog = ModelCatalog(store, downloads, lambda: cluster_memory(parts.cluster))

    http = HypercornConfig()
    http.bind = [bind_address(config.api_host, config.api_port)]
    http.accesslog = None
    http.errorlog = logging.getLogger("hypercorn.error")
    http.graceful_timeout = 2.0

    parts = build_node(
        NodeSetup(
            node_id=node_id,
            host=host,
            card=card,
            encoder=encoder,
            models={model_id: model_info(model_path, model_id)},
            serve=(model_id,),
            api=config.api,
            cluster=ClusterSettings(
                auto_place=config.auto_place,
                expected_peers=len(config.peers),
                # Peers can come only from --peer, or from discovery, which needs a secret.
                settle=config.settle if (config.peers or discovers(config)) else 0.0,
            ),
            links=LinkSetup(
                cluster_id=config.cluster_id,
                secret=config.cluster_secret,
                listen_host=listen_host,
                listen_port=config.listen_port,
                peers=config.peers,
                allow_weak_secret=config.allow_weak_secret,
            ),
            http=http,
            catalog=catalog,
        ),
        NodeEffects(
            launcher_for=shard_launcher_factory(
                {model_id: model_path},
                config.max_batch,
                config.data_dir / "run",
                config.cores,
            ),
            seams=seams,
            memory_free=memory_available,
            free_ports=lambda: free_ports(host),
            remembered_vote=load_vote(config.data_dir),
            remember_vote=lambda vote: save_vote(config.data_dir, vote),
        ),
    )
    node = parts.node

    async with trio.open_nursery() as nursery:
        # Ctrl-C or SIGTERM: drain, end what is left with error events, then stop.
        nursery.start_soon(
            graceful_stop,
            nursery.cancel_scope,
            node,
            parts.router,
            parts.shards,
            parts.links,
            config.drain_timeout,
        )
        await nursery.start(downloads.run)
        binds = await nursery.start(parts.run)
        logging.getLogger("exo_trio.net").info(
            "links listening on %s:%s", listen_host, parts.links.listen_port
        )
        # LAN discovery: off without a secret (links are loopback-only then).
        await nursery.start(Discovery(parts.links, enabled=config.discovery).run)
        log.debug("API bound to %s", ", ".join(binds))

        def load_state() -> tuple[str, float, str] | None:
            worker = node.local_worker()
            if worker is None:
                return None
            return worker.state, worker.load_fraction, worker.load_phase

        nursery.start_soon(
            console.announce, model_id, binds, lambda: node.ready(model_id), load_state
        )
    log.info("node stopped")
