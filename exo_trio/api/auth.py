"""API keys and CORS.

With an API key set, every endpoint but /health, / (a heartbeat, or the dashboard's
page) and the dashboard's files needs it, as `Authorization:
Bearer KEY` (what OpenAI and Ollama clients send) or `x-api-key: KEY` (what the
Anthropic client sends). /health stays open so load balancers and supervisors can
probe without a secret. A node whose API listens beyond loopback refuses to start
without a key unless told `--insecure-no-api-key`: anyone who can reach the port
could otherwise spend its compute.

CORS is off unless origins are configured; browser preflights (OPTIONS) are
answered before the key check, since browsers never send credentials on them.
"""

from __future__ import annotations

import hmac
import ipaddress

from quart import Response, request

from exo_trio.api.errors import ApiError
from exo_trio.api.settings import ApiSettings

# `/` says only that the server is up (Ollama's clients probe it before anything).
OPEN_PATHS = frozenset({"/health", "/"})
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
# The dashboard's files: a page and its scripts, no data (the page sends the key).
OPEN_PREFIX = "/dashboard/"
EXPOSED_HEADERS = "X-Request-Id"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def check_exposure(host: str, settings: ApiSettings, insecure_no_api_key: bool) -> None:
    """Refuse to serve a non-loopback address without an API key."""
    if settings.api_key or insecure_no_api_key or is_loopback(host):
        return
    raise SystemExit(
        f"exo-trio: refusing to serve the API on {host} without an API key. Set "
        "--api-key (or EXO_TRIO_API_KEY), or pass --insecure-no-api-key to allow "
        "anyone who can reach this port to use it."
    )


def presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def require_key(settings: ApiSettings) -> None:
    if not settings.api_key or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIX):
        return
    key = presented_key()
    # Constant-time comparison: the key must not leak through response timing.
    if key is None or not hmac.compare_digest(key.encode(), settings.api_key.encode()):
        raise ApiError(
            401,
            "Missing or invalid API key. Send `Authorization: Bearer <key>` or `x-api-key: <key>`.",
            type="authentication_error",
            code="invalid_api_key",
        )


def allowed_origin(settings: ApiSettings) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None or not settings.cors_origins:
        return None
    if "*" in settings.cors_origins:
        return "*"
    return origin if origin in settings.cors_origins else None


def preflight(settings: ApiSettings) -> Response | None:
    """Answer a CORS preflight for an allowed origin; None for anything else."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    origin = allowed_origin(settings)
    if origin is None:
        return None
    response = Response("", status=204)
    response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
    response.headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", "authorization, content-type, x-api-key"
    )
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def add_cors_headers(response: Response, settings: ApiSettings) -> None:
    origin = allowed_origin(settings)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    if origin != "*":
        response.headers.add("Vary", "Origin")
