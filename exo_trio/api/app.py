"""The Quart-Trio application: routes, error envelopes, limits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from exo_trio.api import openai_chat
from exo_trio.api.errors import ApiError, openai_error_body
from exo_trio.node import ModelCard, Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    # Seconds without an event before a streaming response sends a keep-alive.
    keepalive_interval: float = 2.0


def error_response(error: ApiError) -> Response:
    response = jsonify(openai_error_body(error))
    response.status_code = error.status
    return response


def create_app(node: Node, settings: ApiSettings | None = None) -> QuartTrio:
    settings = settings or ApiSettings()
    app = QuartTrio("exo_trio")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        # Streams last as long as generation does; the request's own lifecycle,
        # not a blanket timeout, decides when it ends.
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=60,
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]

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

    @app.post("/v1/chat/completions")
    async def chat_completions() -> object:
        return await openai_chat.chat_completions(node, settings.keepalive_interval)

    @app.get("/v1/models")
    async def list_models() -> object:
        return {"object": "list", "data": [model_entry(m) for m in node.models()]}

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> object:
        model = node.find_model(model_id)
        if model is None:
            raise ApiError(
                404,
                f"The model `{model_id}` does not exist.",
                param="model",
                code="model_not_found",
            )
        return model_entry(model)

    @app.get("/health")
    async def health() -> object:
        ok, body = node.health()
        return body, 200 if ok else 503

    return app


def model_entry(model: ModelCard) -> dict[str, object]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "context_length": model.context_length,
    }
