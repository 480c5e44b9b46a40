"""The Quart-Trio application: routes, error envelopes, auth, CORS, metrics."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from exo_trio.api import (
    anthropic,
    bench,
    completions,
    dashboard,
    events,
    instances,
    ollama,
    ollama_models,
    ollama_pull,
    openai_chat,
    ops,
    responses,
)
from exo_trio.api.access_log import AccessLog
from exo_trio.api.admission import Admission, ExchangeScope
from exo_trio.api.auth import add_cors_headers, preflight, require_key
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, dialect_for_path, render_error
from exo_trio.api.keep_alive import ConnectionReuse
from exo_trio.api.serving import SEND_TIMEOUT_KEY
from exo_trio.api.settings import ApiSettings
from exo_trio.node import ModelCard, Node
from exo_trio.publisher import Publisher

if TYPE_CHECKING:
    from exo_trio.cluster import Cluster

__all__ = ["ApiSettings", "create_app"]

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]

OLLAMA_PREFIXES = ("/api", "/ollama/api")


def error_response(error: ApiError) -> Response:
    """The error in the envelope of the dialect the request's path belongs to."""
    body, status = render_error(error, dialect_for_path(request.path))
    response = jsonify(body)
    response.status_code = status
    return response


def routes() -> list[tuple[str, str, Handler]]:
    table: list[tuple[str, str, Handler]] = [
        ("POST", "/v1/chat/completions", openai_chat.chat_completions),
        ("POST", "/v1/completions", completions.completions),
        ("POST", "/v1/responses", responses.responses),
        ("POST", "/v1/messages", anthropic.messages),
        ("POST", "/v1/messages/count_tokens", anthropic.count_tokens),
        ("POST", "/bench/chat/completions", bench.bench_chat_completions),
        ("GET", "/v1/models", list_models),
        ("GET", "/v1/models/<path:model_id>", get_model),
        ("POST", "/v1/cancel/<path:request_id>", ops.cancel),
        ("GET", "/metrics", ops.metrics),
        ("GET", "/health", health),
        ("GET", "/v1/instances", instances.list_instances),
        ("POST", "/v1/instances", instances.create),
        ("DELETE", "/v1/instances/<path:instance_id>", instances.delete),
        ("GET", "/state", instances.state),
        ("GET", "/", dashboard.root),  # the page for browsers, else the heartbeat
        ("GET", "/dashboard/<path:name>", dashboard.asset),
        ("GET", "/v1/events", events.events),
    ]
    for prefix in OLLAMA_PREFIXES:
        table += [
            ("POST", f"{prefix}/chat", ollama.chat),
            ("POST", f"{prefix}/generate", ollama.generate),
            ("GET", f"{prefix}/tags", ollama_models.tags),
            ("POST", f"{prefix}/show", ollama_models.show),
            ("GET", f"{prefix}/ps", ollama_models.ps),
            ("GET", f"{prefix}/version", ollama_models.version),
            ("POST", f"{prefix}/pull", ollama_pull.pull),
            ("DELETE", f"{prefix}/delete", ollama_pull.delete),
        ]
    return table


def create_app(
    node: Node, settings: ApiSettings | None = None, cluster: Cluster | None = None
) -> QuartTrio:
    settings = settings or ApiSettings()
    ctx = ApiContext(node, settings, Admission(node, settings.max_queued), cluster)
    # The node's observer wakes the event streams (GET /v1/events); a node built
    # with another observer (the simulator's) still serves them, by sampling.
    observer = node.seams.observer
    ctx.events = observer if isinstance(observer, Publisher) else Publisher()
    app = QuartTrio("exo_trio")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        # Streams last as long as generation does; the request's own lifecycle,
        # not a blanket timeout, decides when it ends.
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=60,
        JSON_SORT_KEYS=False,
    )
    # Read by api/serving.serve: how long one write to a client may block.
    app.config[SEND_TIMEOUT_KEY] = settings.send_timeout
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Admission slots are released when the whole HTTP exchange ends; the access
    # line is written then too.
    asgi = AccessLog(ExchangeScope(app.asgi_app))
    app.asgi_app = ConnectionReuse(asgi, settings.max_body_bytes)  # type: ignore[method-assign]

    @app.before_request
    async def guard() -> Response | None:
        answer = preflight(settings)
        if answer is not None:
            return answer
        require_key(settings)
        return None

    @app.after_request
    async def finish(response: Response) -> Response:
        add_cors_headers(response, settings)
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        node.metrics.http_requests.labels(rule, str(response.status_code)).inc()
        return response

    @app.errorhandler(ApiError)
    async def on_api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        status = error.code or 500
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = error.description or error.name
        if status == 413:
            message = f"Request body too large (limit {settings.max_body_bytes} bytes)."
        return error_response(ApiError(status, message, code=kinds.get(status)))

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        log.exception("unhandled error in request")
        return error_response(
            ApiError(500, "Internal server error.", type="server_error", code="internal_error")
        )

    for method, rule, handler in routes():
        app.add_url_rule(rule, f"{method} {rule}", bind(handler, ctx), methods=[method])
    return app


def bind(handler: Handler, ctx: ApiContext) -> Handler:
    async def view(**params: str) -> Any:
        return await handler(ctx, **params)

    view.__name__ = handler.__name__
    return view


async def list_models(ctx: ApiContext) -> dict[str, object]:
    """The models this node takes requests for, and (not OpenAI's, for the CLI and
    dashboards) each one's `status`, plus the models being downloaded here with
    their progress."""
    node = ctx.node
    data = [model_entry(m, ctx) for m in node.models()]
    for entry in data:
        entry.setdefault("status", model_status(ctx, str(entry["id"])))
    listed = {m.id for m in node.models()}
    catalog = node.catalog
    for download in catalog.downloads_in_flight() if catalog is not None else []:
        progress = {"completed": download["completed"], "total": download["total"]}
        entry = next((e for e in data if e["id"] == download["model"]), None)
        if entry is None and download["model"] not in listed:
            entry = {"id": download["model"], "object": "model", "owned_by": "exo-trio"}
            data.append(entry)
        if entry is not None:
            entry.update(status="downloading", download=progress)
    return {"object": "list", "data": data}


def model_status(ctx: ApiContext, model_id: str) -> str:
    """ready, or the state of the model's instance (placing, downloading, loading)."""
    if ctx.node.ready(model_id):
        return "ready"
    if ctx.cluster is None:
        return "unavailable"
    states = [s.state for s in ctx.cluster.live_instances() if s.spec.model == model_id]
    return states[0] if states else "unavailable"


async def get_model(ctx: ApiContext, model_id: str) -> dict[str, object]:
    model = ctx.node.find_model(model_id)
    if model is None:
        raise ApiError(
            404,
            f"The model `{model_id}` does not exist.",
            param="model",
            code="model_not_found",
        )
    return model_entry(model, ctx)


async def health(ctx: ApiContext) -> tuple[dict[str, object], int]:
    ok, body = ctx.node.health()
    wedged = wedged_reason(ctx)
    if ok and wedged is not None:
        # The process is alive and its pipe open, but it has stopped working: a
        # load balancer should send new requests elsewhere.
        ok = False
        body = {**body, "status": "unavailable", "reason": wedged}
    # Live Trio tasks in this process: once every client is gone this must return
    # to its idle value, or something (a handler, a relay, a timer) leaked.
    return {**body, "tasks": live_tasks()}, 200 if ok else 503


def live_tasks() -> int:
    count = 0
    nurseries = list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            count += 1
            nurseries.extend(task.child_nurseries)
    return count


def wedged_reason(ctx: ApiContext) -> str | None:
    """Why the local runner counts as wedged (work held, no progress), or None."""
    limit = ctx.settings.wedge_timeout
    worker = ctx.node.local_worker()
    if limit <= 0 or worker is None:
        return None
    stalled = worker.stalled_for()
    if stalled < limit:
        return None
    return (
        f"runner wedged: {len(worker.jobs)} request(s) in hand and no progress "
        f"for {stalled:.0f}s (limit {limit:g}s)"
    )


def model_entry(model: ModelCard, ctx: ApiContext) -> dict[str, object]:
    entry: dict[str, object] = {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "context_length": model.context_length,
    }
    failure = ctx.node.model_failure(model.id)
    if failure is not None:
        # An extension: a model that failed to load says so, and why.
        entry["status"] = "failed"
        entry["error"] = failure
    return entry
