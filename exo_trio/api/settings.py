"""What an operator can configure about the HTTP API (flags of `exo-trio node`)."""

from __future__ import annotations

from dataclasses import dataclass

from exo_trio.api.timeouts import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TTFT_TIMEOUT,
    RequestTimeouts,
)

DEFAULT_MAX_QUEUED = 64
# A streaming write that cannot go out for this long means the client stopped
# reading without closing: its connection is closed and its request cancelled.
DEFAULT_SEND_TIMEOUT = 60.0
# A runner that holds work and reports nothing for this long is wedged (/health 503).
DEFAULT_WEDGE_TIMEOUT = 120.0


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
    # Per-request limits in seconds, 0 = off (api/timeouts.py): until the first
    # token, between tokens, and overall.
    ttft_timeout: float = DEFAULT_TTFT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    # Seconds one write to a client may block before the connection is dropped
    # (api/serving.py), 0 = off; and how long a runner may hold work without
    # progress before /health calls it wedged, 0 = never.
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    wedge_timeout: float = DEFAULT_WEDGE_TIMEOUT

    @property
    def timeouts(self) -> RequestTimeouts:
        return RequestTimeouts(self.ttft_timeout, self.idle_timeout, self.request_timeout)
