"""Cluster operations: GET/POST /v1/instances, DELETE /v1/instances/{id}, GET /state.

Placement requests from any node are answered by the leader (Cluster.place
forwards them), so a client can talk to whichever node it knows.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from quart import request

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.cluster import Cluster
from exo_trio.cluster_messages import PlaceReply, PlaceRequest


class InstanceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    sharding: Literal["pipeline", "tensor"] = "pipeline"
    nodes: list[str] | None = None
    min_nodes: int = 1


def cluster_of(ctx: ApiContext) -> Cluster:
    if ctx.cluster is None:
        raise ApiError(404, "This node does not run the cluster.", code="not_found")
    return ctx.cluster


async def create(ctx: ApiContext) -> tuple[dict[str, object], int]:
    body = decode_body(await request.get_data(cache=False), InstanceRequest)
    if body.min_nodes < 1:
        raise ApiError(400, "min_nodes must be at least 1.", param="min_nodes")
    cluster = cluster_of(ctx)
    reply = await cluster.place(
        PlaceRequest(
            call_id=ctx.node.seams.new_id("call"),
            model=body.model,
            sharding=body.sharding,
            nodes=tuple(body.nodes) if body.nodes is not None else None,
            min_nodes=body.min_nodes,
        )
    )
    return answer(reply)


async def delete(ctx: ApiContext, instance_id: str) -> tuple[dict[str, object], int]:
    cluster = cluster_of(ctx)
    reply = await cluster.place(
        PlaceRequest(call_id=ctx.node.seams.new_id("call"), delete=instance_id)
    )
    return answer(reply)


def answer(reply: PlaceReply) -> tuple[dict[str, object], int]:
    if not reply.ok:
        code = {404: "not_found", 400: "placement_failed"}.get(reply.status, "cluster_error")
        kind = "invalid_request_error" if reply.status < 500 else "server_error"
        raise ApiError(reply.status, reply.message, type=kind, code=code)
    body: dict[str, object] = {"status": reply.message}
    if reply.instance is not None:
        body["instance"] = msgspec.to_builtins(reply.instance)
        body["id"] = reply.instance.instance_id
    return body, reply.status


async def list_instances(ctx: ApiContext) -> dict[str, object]:
    state = cluster_of(ctx).state()
    return {"object": "list", "data": state["instances"]}


async def state(ctx: ApiContext) -> dict[str, object]:
    return cluster_of(ctx).state()
