"""One log line per HTTP request, written when its exchange ends.

    POST /v1/chat/completions 200 model=demo prompt=13 completion=20 end=length
        ttft=0.012s total=0.104s id=chatcmpl-... client=127.0.0.1:50412

(one line; logger `exo_trio.access`). Method, path, status and total time come
from the exchange itself (an ASGI middleware, so a streaming response is logged
when its last byte went out, or when its client went away: `status=-` if no
response was started). A generation request adds its model, prompt and
completion tokens, how it ended (stop, length, or the failure kind), time to
first token and request id, noted by api/generation.py. GET /health and /metrics
are logged at DEBUG (load balancers poll them); everything else at INFO. With
`--log-format json` the same fields are keys of the JSON line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import trio

from exo_trio.types import GenerationFinished, TerminalEvent, TextGeneration

log = logging.getLogger("exo_trio.access")

QUIET_PATHS = frozenset({"/health", "/metrics"})
_current: ContextVar[dict[str, Any] | None] = ContextVar("exo_trio_access", default=None)


def note_generation(
    command: TextGeneration,
    started: float,
    first_token: float | None,
    chunks: int,
    terminal: TerminalEvent | None,
) -> None:
    """Record what the current exchange's generation did (a no-op outside one)."""
    record = _current.get()
    if record is None:
        return
    record["model"] = command.model
    record["prompt"] = len(command.prompt_tokens)
    if isinstance(terminal, GenerationFinished):
        record["completion"] = terminal.completion_tokens
        record["end"] = terminal.finish_reason
    else:
        record["completion"] = chunks
        record["end"] = terminal.kind if terminal is not None else "client_gone"
    if first_token is not None:
        record["ttft"] = round(first_token - started, 4)
    record["id"] = command.request_id


def format_line(record: dict[str, Any]) -> str:
    status = record.get("status") or "-"
    parts = [f"{record['method']} {record['path']} {status}"]
    for key in ("model", "prompt", "completion", "end"):
        if key in record:
            parts.append(f"{key}={record[key]}")
    if "ttft" in record:
        parts.append(f"ttft={record['ttft']:.3f}s")
    parts.append(f"total={record['total']:.3f}s")
    for key in ("id", "client"):
        if record.get(key):
            parts.append(f"{key}={record[key]}")
    return " ".join(parts)


class AccessLog:
    """ASGI middleware: logs each HTTP exchange once it has ended, however it ended."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record: dict[str, Any] = {
            "method": scope.get("method", "?"),
            "path": scope.get("path", "?"),
            "status": None,
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        started = trio.current_time()

        async def watch(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                record["status"] = message.get("status")
            await send(message)

        token = _current.set(record)
        try:
            await self.app(scope, receive, watch)
        finally:
            _current.reset(token)
            record["total"] = round(trio.current_time() - started, 4)
            level = logging.DEBUG if record["path"] in QUIET_PATHS else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "%s", format_line(record), extra={"fields": record})
