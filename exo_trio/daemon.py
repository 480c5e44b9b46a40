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

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig

from exo_trio import console
from exo_trio.affinity import CoreSplit
from exo_trio.api.auth import check_exposure
from exo_trio.api.settings import ApiSettings
from exo_trio.assembly import AssembledNode, LinkSetup, NodeEffects, NodeSetup, build_node
from exo_trio.blas import choose_blas
from exo_trio.cluster import Cluster, ClusterSettings
from exo_trio.cluster_messages import ModelInfo
from exo_trio.cluster_state import Vote
from exo_trio.demo_model import ensure_demo_model
from exo_trio.downloads import Downloads
from exo_trio.hub_download import DownloadProgress, HubClient
from exo_trio.hub_plan import HubError, parse_hub_ref
from exo_trio.model_catalog import ModelCatalog, served_model
from exo_trio.model_info import model_info
from exo_trio.model_store import ModelStore, cache_repo_id, name_for_path
from exo_trio.net.discovery import Discovery
from exo_trio.net.interfaces import WILDCARD_HOSTS, interface_addresses, is_loopback
from exo_trio.node import ServedModel
from exo_trio.publisher import Publisher
from exo_trio.runner.protocol import DEFAULT_PROMPT_CACHE_BYTES
from exo_trio.runner_launch import shard_launcher_factory
from exo_trio.seams import Seams
from exo_trio.shutdown import graceful_stop
from exo_trio.startup import StartupError, default_data_dir
from exo_trio.system import memory_available, memory_total
from exo_trio.terminal import ProgressBar

log = logging.getLogger("exo_trio")


@dataclass
class NodeConfig:
    # Models to serve from the start: directories, or hub ids `org/name[@revision]`.
    # None given: the demo model, unless no_model (a node that starts empty and
    # gets its models placed at run time).
    models: tuple[str, ...] = ()
    no_model: bool = False
    # The names to serve them under, in order (default: hub id or directory name).
    served_model_names: tuple[str, ...] = ()
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
    # The bound of each runner's prefix cache (runner/prefix_cache.py); 0: off.
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES


async def pin_models(config: NodeConfig, catalog: ModelCatalog) -> list[ServedModel]:
    """The models the node was started with (--model, else the demo model unless
    --no-model), described and loaded for serving: a directory as it is, a hub model
    described from the hub (its weights are fetched by the shards that need them,
    once the model is placed). A model mlx-lm cannot load, or (alone, with no
    --peer) one too big for this node's memory, stops the start with the reason."""
    names = list(config.served_model_names)
    wanted = list(config.models)
    if not wanted and not config.no_model:
        log.info("no --model given: serving the built-in demo model")
        wanted = [str(ensure_demo_model(config.data_dir))]
    served = []
    # Raised after the nursery, so it reaches the CLI bare, not in an exception group.
    problem: StartupError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(catalog.downloads.run)
        try:
            for i, text in enumerate(wanted):
                name = names[i] if i < len(names) else None
                served.append(await pin_model(config, catalog, text, name))
        except HubError as exc:
            problem = StartupError(f"cannot serve {text}: {exc}")
        except StartupError as exc:
            problem = exc
        finally:
            nursery.cancel_scope.cancel()
    if problem is not None:
        raise problem
    return served


async def pin_model(
    config: NodeConfig, catalog: ModelCatalog, text: str, name: str | None
) -> ServedModel:
    local = await trio.to_thread.run_sync(describe_directory, text, name)
    if local is not None:
        info, path = local
    else:
        ref = parse_hub_ref(text)
        if ref is None:
            raise StartupError(
                f"--model {text}: no such directory, and not a hub model id "
                "(org/name or org/name@revision)"
            )
        # Alone, the node must hold it; with peers, placement judges (it may split it).
        info, path = await catalog.resolve(ref.name, check_memory=not config.peers)
        if name is not None:
            info = msgspec.structs.replace(info, id=name)
    log.info("model %s from %s", info.id, path)
    catalog.pin(info, path)
    return await trio.to_thread.run_sync(served_model, info.id, path, info)


def describe_directory(text: str, name: str | None) -> tuple[ModelInfo, Path] | None:
    """A model directory given by path (None if `text` is not a directory). A
    snapshot of an HF cache keeps its repo and commit, so other nodes can fetch it."""
    path = Path(text).expanduser()
    if not path.is_dir():
        return None
    path = path.resolve()
    if not (path / "config.json").is_file():
        raise StartupError(f"{path} is not an MLX model directory (no config.json)")
    repo = cache_repo_id(path.parent.parent.name) if path.parent.name == "snapshots" else None
    commit = path.name if repo is not None else None
    return model_info(path, name or name_for_path(path), repo=repo, commit=commit), path


async def show_downloads(catalog: ModelCatalog, interval: float = 0.2) -> None:
    """A progress bar (on a terminal; else a line every few seconds) while this
    node downloads model weights."""
    bar: ProgressBar | None = None
    shown: list[DownloadProgress] = []  # the downloads the bar counts
    while True:
        flying = catalog.downloads.in_flight()
        if flying and bar is None:
            bar = ProgressBar("downloading " + ", ".join(sorted({p.model for p in flying})))
        if bar is not None:
            ids = {id(p) for p in flying}
            shown = [*(p for p in shown if id(p) not in ids), *flying]
            bar.show(sum(p.completed for p in shown), sum(p.total for p in shown))
            if not flying:  # all done (or failed): the bar ends on their last figures
                bar.close()
                bar, shown = None, []
        await trio.sleep(interval)


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
    node_id = load_node_id(config)
    blas = choose_blas()
    if blas.hint:
        log.warning("runners compute with %s: %s", blas.name, blas.hint)
    else:
        log.info("runners compute with %s", blas.name)
    store = ModelStore(config.data_dir)
    downloads = Downloads(HubClient(store.hub_cache))
    catalog = ModelCatalog(store, downloads, lambda: [memory_available()])
    await catalog.refresh()
    served = await pin_models(config, catalog)
    log.info("node %s; serving %s", node_id, ", ".join(m.card.id for m in served) or "nothing yet")
    # The observer wakes the dashboard's event streams (publisher.py).
    seams = Seams(observer=Publisher())
    listen_host = config.listen_host or ("0.0.0.0" if config.cluster_secret else "127.0.0.1")
    host = reachable_host(config, listen_host)
    parts: AssembledNode
    catalog.cluster_memory = lambda: cluster_memory(parts.cluster)

    http = HypercornConfig()
    http.bind = [bind_address(config.api_host, config.api_port)]
    http.accesslog = None
    http.errorlog = logging.getLogger("hypercorn.error")
    http.graceful_timeout = 2.0

    parts = build_node(
        NodeSetup(
            node_id=node_id,
            host=host,
            served=served,
            models=catalog.infos,  # the catalog keeps it up to date
            serve=tuple(m.card.id for m in served),
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
                catalog.model_dir,
                config.max_batch,
                config.data_dir / "run",
                config.cores,
                prompt_cache_bytes=config.prompt_cache_bytes,
                blas=blas,
            ),
            seams=seams,
            memory_free=memory_available,
            memory_total=memory_total,
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
        binds = await nursery.start(parts.run)
        nursery.start_soon(show_downloads, catalog)
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

        if node.model is None:
            for url in binds:
                log.info(
                    "ready: serving no model yet at %s (place one: exo-trio run MODEL, or "
                    "POST /v1/instances)",
                    url,
                )
        else:
            first = node.model.id
            nursery.start_soon(
                console.announce, first, binds, lambda: node.ready(first), load_state
            )
    log.info("node stopped")
