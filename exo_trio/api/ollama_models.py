"""Ollama's model catalogue: GET /api/tags, POST /api/show, GET /api/ps,
GET /api/version (also under /ollama/).

Models are listed under Ollama-style names with the `:latest` tag, and found by
either form. The catalogue is what this node serves; there is no pull or delete.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.ollama import ollama_model
from exo_trio.node import ModelCard

# The Ollama API version these endpoints follow. Clients such as editors check
# /api/version against a minimum, so this names the API, not exo-trio's release.
OLLAMA_API_VERSION = "0.12.0"


class ShowRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # the older spelling of `model`
    verbose: bool = False


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def details(model: ModelCard) -> dict[str, object]:
    family = model.architecture or "unknown"
    return {
        "parent_model": "",
        "format": "mlx",
        "family": family,
        "families": [family],
        "parameter_size": "",
        "quantization_level": "",
    }


def entry(model: ModelCard) -> dict[str, object]:
    name = f"{model.id}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": timestamp(model.created),
        "size": model.size_bytes,
        "digest": model.digest,
        "details": details(model),
    }


async def tags(ctx: ApiContext) -> dict[str, object]:
    return {"models": [entry(m) for m in ctx.node.models()]}


async def ps(ctx: ApiContext) -> dict[str, object]:
    # A runner holds its model for the node's lifetime: loaded means ready.
    return {
        "models": [
            {**entry(m), "size_vram": m.size_bytes, "context_length": m.context_length}
            for m in ctx.node.models()
            if ctx.node.ready(m.id)
        ]
    }


async def show(ctx: ApiContext) -> dict[str, object]:
    body = decode_body(await ctx.body(), ShowRequest)
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model is required.", param="model")
    model = ollama_model(ctx.node, name)
    arch = model.architecture or "unknown"
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "license": "",
        "details": details(model),
        "model_info": {
            "general.architecture": arch,
            f"{arch}.context_length": model.context_length,
        },
        "capabilities": ["completion"],
        "modified_at": timestamp(model.created),
    }


async def version(ctx: ApiContext) -> dict[str, object]:
    return {"version": OLLAMA_API_VERSION}
