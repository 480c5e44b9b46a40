"""Ollama's model catalogue: GET /api/tags, POST /api/show, GET /api/ps,
GET /api/version (also under /ollama/).

Models are listed under Ollama-style names with the `:latest` tag, and found by
either form. /api/tags lists the node's store (every model it can load, and those
it serves); /api/ps the models loaded in the cluster. Pull and delete are in
ollama_pull.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import trio

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.ollama import ollama_model
from exo_trio.model_catalog import digest
from exo_trio.model_store import StoredModel
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


def stored_entry(model: StoredModel) -> dict[str, object]:
    card = ModelCard(
        id=model.name,
        context_length=0,
        created=int(model.modified),
        architecture=model.architecture,
        size_bytes=model.size_bytes,
        digest=digest(model),
    )
    # `complete` is not Ollama's: a node of a cluster may hold only its layers' files.
    return {**entry(card), "complete": model.complete}


async def tags(ctx: ApiContext) -> dict[str, object]:
    served = {m.id: entry(m) for m in ctx.node.models()}
    catalog = ctx.node.catalog
    # The store is read from disk (an HF cache may hold many models): not on the loop.
    stored = await trio.to_thread.run_sync(catalog.store.models) if catalog is not None else []
    found = served | {m.name: stored_entry(m) for m in stored}
    return {"models": [found[name] for name in sorted(found)]}


async def stored_card(ctx: ApiContext, name: str) -> ModelCard | None:
    """A model in the store that does not run (Ollama shows any pulled model)."""
    catalog = ctx.node.catalog
    name = name.removesuffix(":latest")
    info = catalog.infos.get(name) if catalog is not None else None
    if catalog is None or info is None:
        return None
    stored = await trio.to_thread.run_sync(catalog.store.find, name)
    return ModelCard(
        id=name,
        context_length=info.context_length,
        created=int(stored.modified) if stored is not None else 0,
        architecture=stored.architecture if stored is not None else "",
        size_bytes=info.size_bytes,
    )


async def ps(ctx: ApiContext) -> dict[str, object]:
    # The models that run in the cluster (loaded), as this node takes requests for them.
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
    model = ctx.node.find_model(name.removesuffix(":latest")) or await stored_card(ctx, name)
    if model is None:
        model = ollama_model(ctx.node, name)  # the 404
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
