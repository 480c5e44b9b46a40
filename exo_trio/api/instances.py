"""Cluster operations: GET/POST /v1/instances, DELETE /v1/instances/{id}, GET /state.

Placement requests from any node are answered by the leader (Cluster.place
forwards them), so a client can talk to whichever node it knows.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from quart import request

from exo_trio.api import loading
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.loading import cluster_of
from exo_trio.cluster_messages import PlaceReply, PlaceRequest


class InstanceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    sharding: Literal["pipeline", "tensor"] = "pipeline"
    nodes: list[str] | None = None
    min_nodes: int = 1


async def create(ctx: ApiContext) -> tuple[dict[str, object], int]:
    body = decode_body(await request.get_data(cache=False), InstanceRequest)
    if body.min_nodes < 1:
        raise ApiError(400, "min_nodes must be at least 1.", param="min_nodes")
    # Any model in a node's store, or on the hub (described here, fetched by the
    # nodes that run it): see api/loading.py.
    reply = await loading.place(
        ctx,
        body.model,
        body.sharding,
        tuple(body.nodes) if body.nodes is not None else None,
        body.min_nodes,
    )
    return answer(reply)


async def delete(ctx: ApiContext, instance_id: str) -> tuple[dict[str, object], int]:
    cluster = cluster_of(ctx)
    reply = await cluster.place(
        PlaceRequest(call_id=ctx.node.seams.new_id("call"), delete=instance_id)
    )
    return answer(reply)


def answer(reply: PlaceReply) -> tuple[dict[str, object], int]:
    loading.raise_for(reply)
    body: dict[str, object] = {"status": reply.message}
    if reply.instance is not None:
        body["instance"] = msgspec.to_builtins(reply.instance)
        body["id"] = reply.instance.instance_id
    return body, reply.status


async def list_instances(ctx: ApiContext) -> dict[str, object]:
    state = cluster_of(ctx).state()
    return {"object": "list", "data": state["instances"]}


async def state(ctx: ApiContext) -> dict[str, object]:
    """The cluster as this node sees it, its runners' BLAS and prefix cache, and the
    downloads in flight on this node."""
    cluster = cluster_of(ctx)
    state = cluster.state()
    for shard in state["shards"]:
        worker = cluster.shards.worker(shard["instance_id"])
        if worker is not None:
            shard["runner"] = worker.runner_report()
    catalog = ctx.node.catalog
    state["downloads"] = catalog.downloads_in_flight() if catalog is not None else []
    return state
