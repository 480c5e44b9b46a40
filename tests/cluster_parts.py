"""A node's cluster-side parts wired as assembly.build_node wires them, around
links and runners a test provides (in-memory links, fake or no runners)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exo_trio.cluster import Cluster
from exo_trio.peer_messages import Outbox, PeerMessages
from exo_trio.router import Router
from exo_trio.shard_manager import LauncherFactory, ShardManager
from exo_trio.streams import StreamRegistry


@dataclass
class Parts:
    registry: StreamRegistry
    shards: ShardManager
    router: Router
    cluster: Cluster
    messages: PeerMessages


def no_runner(spec: Any, rank: int) -> Any:
    raise AssertionError("this test starts no runner")


def cluster_parts(
    node_id: str,
    links: Outbox,
    launcher_for: LauncherFactory = no_runner,
    **cluster: Any,
) -> Parts:
    """`cluster`: the Cluster's own arguments (models, serve, settings, ...)."""
    registry = StreamRegistry()
    messages = PeerMessages(node_id)
    shards = ShardManager(launcher_for)
    counter = iter(range(10**9))

    def new_id(prefix: str) -> str:
        return f"{prefix}-{node_id}-{next(counter)}"

    router = Router(node_id, registry, shards, messages.send, new_id)
    made = Cluster(
        node_id=node_id,
        shards=shards,
        router=router,
        send=messages.send,
        new_id=new_id,
        **{"host": node_id, "memory_free": lambda: 10**9, "free_ports": lambda: (5000,), **cluster},
    )
    messages.attach(links=links, router=router, cluster=made)
    return Parts(registry, shards, router, made, messages)
