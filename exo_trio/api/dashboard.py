"""The dashboard: a page for browsers at `/`, its files under `/dashboard/`.

The files are plain HTML, CSS and JavaScript modules inside the package
(exo_trio/dashboard/): no build step, nothing fetched from elsewhere. `GET /`
answers the page only to a request that asks for HTML (a browser); any other
client still gets the heartbeat Ollama's clients probe (ops.root). The page and
its files are open without the API key (they hold no data); the page asks for the
key when the API refuses it, and sends it with every call (docs/dashboard.md).
"""

from __future__ import annotations

from importlib import resources

from quart import Response, request

from exo_trio.api import ops
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError

PREFIX = "/dashboard/"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_files = resources.files("exo_trio") / "dashboard"


def _asset(name: str) -> Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    path = _files / name
    # Only plain names of the shipped files: no directories, no other types.
    if "/" in name or suffix not in TYPES or not path.is_file():
        raise ApiError(404, f"No dashboard file `{name}`.", code="not_found")
    response = Response(path.read_bytes(), content_type=TYPES[suffix])
    # Revalidated each load, so a node upgraded in place serves its new page.
    response.headers["Cache-Control"] = "no-cache"
    return response


def wants_html() -> bool:
    return "text/html" in request.headers.get("Accept", "")


async def root(ctx: ApiContext) -> Response:
    if request.method == "GET" and wants_html():
        return _asset("index.html")
    return await ops.root(ctx)


async def asset(ctx: ApiContext, name: str) -> Response:
    return _asset(name)
