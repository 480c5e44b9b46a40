"""Placing models at run time from the API: `POST /v1/instances`, Ollama's load on
first use (a chat or generate naming a model the cluster does not run yet) and
unload (`keep_alive: 0`), and `/api/delete` of a model that runs.

The node that takes the HTTP request resolves the model first (model_catalog.py):
from its store, or, for a hub model, described from the hub (its small files
fetched, checked as MLX-loadable and as fitting the cluster's memory: a clear 4xx
before anything is downloaded). It then asks the leader to place it (Cluster.place
forwards the request); the leader refuses with the reason when it does not fit
the nodes' free memory, and a model no node has and the hub does not know is a
404. The shards' nodes fetch what they lack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError
from exo_trio.cluster_messages import InstanceStatus, ModelInfo, PlaceReply, PlaceRequest
from exo_trio.hub_plan import HubError
from exo_trio.node import ModelCard

if TYPE_CHECKING:
    from exo_trio.cluster import Cluster

# How long a first use waits for its model to be placed, fetched and loaded.
LOAD_TIMEOUT = 1800.0
POLL = 0.1


def cluster_of(ctx: ApiContext) -> Cluster:
    if ctx.cluster is None:
        raise ApiError(404, "This node does not run the cluster.", code="not_found")
    return ctx.cluster


async def resolve(ctx: ApiContext, name: str) -> ModelInfo | None:
    """The model's facts as this node can tell them (None: it does not know the
    model; the leader may, from another node's report)."""
    catalog = ctx.node.catalog
    if catalog is None:
        return None
    try:
        info, _ = await catalog.resolve(name)
    except HubError as exc:
        if exc.status == 404:
            return None
        raise ApiError(exc.status, exc.message, param="model", code="model_refused") from None
    return info


async def place(
    ctx: ApiContext,
    name: str,
    sharding: str = "pipeline",
    nodes: tuple[str, ...] | None = None,
    min_nodes: int = 1,
) -> PlaceReply:
    info = await resolve(ctx, name)
    return await cluster_of(ctx).place(
        PlaceRequest(
            call_id=ctx.node.seams.new_id("call"),
            model=info.id if info is not None else name.removesuffix(":latest"),
            sharding=sharding,  # type: ignore[arg-type]
            nodes=nodes,
            min_nodes=min_nodes,
            info=info,
        )
    )


def instances_of(cluster: Cluster, name: str) -> list[InstanceStatus]:
    return [s for s in cluster.live_instances() if s.spec.model == name]


async def load(ctx: ApiContext, name: str) -> ModelCard:
    """The model, placed first if the cluster does not run it (Ollama's load on
    first use), once this node can take requests for it. 404 if no node has it
    and it was never pulled, as Ollama says it."""
    node = ctx.node
    name = name.removesuffix(":latest")
    model = node.find_model(name)
    if model is not None:
        return model
    cluster = cluster_of(ctx)
    live = instances_of(cluster, name)
    if live:
        instance_id = live[0].spec.instance_id
    else:
        reply = await place(ctx, name)
        if reply.status == 404:
            raise ApiError(
                404, f'model "{name}" not found, try pulling it first', code="model_not_found"
            )
        raise_for(reply)
        assert reply.instance is not None
        instance_id = reply.instance.instance_id
    with trio.move_on_after(LOAD_TIMEOUT):
        seen = False
        while True:
            model = node.find_model(name)
            if model is not None and node.ready(name):
                return model
            status = (
                next((s for s in cluster.view.instances if s.spec.instance_id == instance_id), None)
                if cluster.view is not None
                else None
            )
            seen = seen or status is not None
            error = None
            if status is not None and status.state == "failed":
                error = status.error
            elif status is None and seen:
                error = "its instance was stopped"
            elif node.catalog is not None:
                error = node.catalog.card_errors.get(instance_id)
            if error is not None:
                raise ApiError(
                    503, f"loading {name} failed: {error}", type="server_error", code="load_failed"
                )
            await trio.sleep(POLL)
    raise ApiError(503, f"{name} did not load within {LOAD_TIMEOUT:.0f}s", type="server_error")


async def unload(ctx: ApiContext, name: str) -> int:
    """Delete every instance of the model; how many there were."""
    cluster = cluster_of(ctx)
    instances = instances_of(cluster, name.removesuffix(":latest"))
    for status in instances:
        raise_for(
            await cluster.place(
                PlaceRequest(call_id=ctx.node.seams.new_id("call"), delete=status.spec.instance_id)
            ),
            allow_missing=True,
        )
    return len(instances)


def raise_for(reply: PlaceReply, allow_missing: bool = False) -> None:
    if reply.ok or (allow_missing and reply.status == 404):
        return
    code = {404: "not_found", 400: "placement_failed"}.get(reply.status, "cluster_error")
    kind = "invalid_request_error" if reply.status < 500 else "server_error"
    raise ApiError(reply.status, reply.message, type=kind, code=code)
