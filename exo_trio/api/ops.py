"""Operating a node: POST /v1/cancel/{request_id}, GET /metrics, and GET / (HEAD /)."""

from __future__ import annotations

from quart import Response

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError
from exo_trio.metrics import CONTENT_TYPE


async def cancel(ctx: ApiContext, request_id: str) -> dict[str, object]:
    """Cancel by the id the client saw (a chatcmpl/msg/resp/cmpl id, or the
    X-Request-Id header of any generation response), on whichever node of the
    cluster the request's client is connected to. The request's own stream then
    ends with its dialect's error terminal."""
    outcome = await ctx.node.cancel_anywhere(request_id)
    if outcome == "unknown":
        raise ApiError(
            503,
            f"Request `{request_id}` is not in flight on this node, and a peer that "
            "may have it could not be asked (link down or no answer); try again.",
            param="request_id",
            code="peer_unreachable",
        )
    if outcome == "absent":
        raise ApiError(
            404,
            f"No request `{request_id}` is in flight on this node or its peers.",
            param="request_id",
            code="request_not_found",
        )
    return {"id": request_id, "object": "request.cancelled", "cancelled": True}


async def metrics(ctx: ApiContext) -> Response:
    return Response(ctx.node.metrics.render(), content_type=CONTENT_TYPE)


async def root(ctx: ApiContext) -> Response:
    """`HEAD /` and `GET /` answer 200 with a line of text, as Ollama's server does:
    its CLI and the UIs built for it probe them as a heartbeat. (A dashboard page
    for browsers belongs here too: it would answer the GETs that ask for HTML.)"""
    return Response("exo-trio is running\n", content_type="text/plain; charset=utf-8")
