"""Ollama's model management on the node's store: POST /api/pull, DELETE /api/delete
(also under /ollama/).

`/api/pull {"model": "org/name[@revision]"}` downloads a hub model into the store
(exo_trio/downloads.py) and, like Ollama's, streams its progress as NDJSON:
`{"status": "pulling manifest"}`, then for each weight file
`{"status": "pulling FILE", "digest": FILE, "total": N, "completed": M}` as it
grows, then `{"status": "success"}`; a failure is an `{"error": ...}` line (the
ollama client raises it). With `"stream": false` the answer waits for the end, and
a failure is an HTTP error: 404 (no such model or revision), 400 (mlx-lm cannot
load it, or it does not fit in the cluster's memory: checked before any weight is
fetched), 403 (gated), 502/503 (the hub failed or is out of reach). A pull whose
clients all go away is cancelled; pulling again resumes it. A model already in
the store is checked against the hub (a newer commit is fetched) unless offline.

`/api/delete {"model": NAME}` removes a model from this node's store (200), 404 if
it is not there, 409 if the node was started with it (--model). A model running in
the cluster is unloaded first (its instances deleted), as Ollama does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import trio
from quart import Response

from exo_trio.api import loading
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.downloads import Download
from exo_trio.hub_plan import parse_hub_ref
from exo_trio.model_catalog import ModelCatalog

NDJSON = "application/x-ndjson"
PROGRESS_INTERVAL = 0.25  # seconds between progress lines while bytes arrive

_json = msgspec.json.Encoder()


class PullRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # the older spelling of `model`
    insecure: bool = False
    stream: bool = True


class DeleteRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None


def catalog_of(ctx: ApiContext) -> ModelCatalog:
    catalog = ctx.node.catalog
    if catalog is None:
        raise ApiError(404, "This node has no model store.", code="not_found")
    return catalog


def model_name(model: str | None, name: str | None) -> str:
    chosen = model or name
    if not chosen:
        raise ApiError(400, "model is required.", param="model")
    return chosen


async def pull(ctx: ApiContext) -> Response | dict[str, object]:
    body = decode_body(await ctx.body(), PullRequest)
    name = model_name(body.model, body.name)
    catalog = catalog_of(ctx)
    ref = parse_hub_ref(name)
    if ref is None:
        if catalog.store.find(name) is not None:
            return {"status": "success"}  # a local model: nothing to fetch
        raise ApiError(
            404,
            f"Model `{name}` is not in the store, and is not a hub model id "
            "(org/name or org/name@revision).",
            param="model",
            code="model_not_found",
        )
    download = catalog.pull(ref)
    if not body.stream:
        try:
            await download.done.wait()
        finally:
            catalog.downloads.leave(download)
        if download.error is not None:
            raise ApiError(download.error.status, download.error.message, code="pull_failed")
        await catalog.refresh()
        return {"status": "success"}
    return Response(
        progress_lines(catalog, download),
        content_type=NDJSON,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def progress_lines(catalog: ModelCatalog, download: Download) -> AsyncIterator[bytes]:
    """The pull's NDJSON progress; the download is let go of when the stream ends
    (done, or the client gone), which cancels it if nobody else waits for it."""
    progress = download.progress
    sent: dict[str, int] = {}
    try:
        yield line({"status": "pulling manifest"})
        while True:
            finished = download.done.is_set()
            weights = [f for f in progress.files if f.endswith(".safetensors")]
            for file in weights:
                done = min(progress.done.get(file, 0), progress.files[file])
                if sent.get(file) != done:
                    sent[file] = done
                    yield line(
                        {
                            "status": f"pulling {file}",
                            "digest": file,
                            "total": progress.files[file],
                            "completed": done,
                        }
                    )
            if finished:
                break
            with trio.move_on_after(PROGRESS_INTERVAL):
                await download.done.wait()
        if download.error is not None:
            yield line({"error": download.error.message})
            return
        yield line({"status": "verifying files"})
        await catalog.refresh()
        yield line({"status": "success"})
    finally:
        catalog.downloads.leave(download)


def line(obj: dict[str, object]) -> bytes:
    return _json.encode(obj) + b"\n"


async def delete(ctx: ApiContext) -> Response:
    body = decode_body(await ctx.body(), DeleteRequest)
    name = model_name(body.model, body.name).removesuffix(":latest")
    catalog = catalog_of(ctx)
    model = catalog.store.find(name)
    if model is None:
        raise ApiError(404, f"model '{name}' not found", param="model", code="model_not_found")
    if model.name in catalog.pinned:
        raise ApiError(
            409,
            f"Model `{name}` is one this node was started to serve (--model): restart the "
            "node without it before deleting it.",
            param="model",
            code="model_in_use",
        )
    if ctx.cluster is not None:
        await loading.unload(ctx, model.name)  # as Ollama does: unload, then delete
    await trio.to_thread.run_sync(catalog.store.delete, model)
    await catalog.refresh()
    return Response("", status=200)
