"""What an operator can configure about the HTTP API (flags of `exo-trio node`)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_QUEUED = 64


@dataclass(frozen=True)
class ApiSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    # Seconds without an event before a streaming response sends a keep-alive.
    keepalive_interval: float = 2.0
    # Admission: how many generation requests may wait beyond what the runner
    # decodes at once (its max batch). Past that a request is refused at once.
    max_queued: int = DEFAULT_MAX_QUEUED
    # When set, every endpoint but /health requires it (Bearer or x-api-key).
    api_key: str | None = None
    # Origins allowed to call the API from a browser; empty = no CORS headers.
    cors_origins: tuple[str, ...] = ()
