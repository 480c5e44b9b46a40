"""What a person running `exo-trio node` sees: log setup, the load progress bar,
and the line that says the node is ready and where.

- Levels: INFO by default; `-v` turns exo-trio's own loggers to DEBUG and leaves
  the libraries' alone (websocket frames, hypercorn); `--log-level` (or
  $EXO_TRIO_LOG) sets any logger: `debug`, or `info,trio_websocket=debug`.
- A node started alone (no --peer, no cluster secret) keeps its cluster machinery
  quiet (leader, terms, placement, links) unless `-v` or `--log-level` asks.
- `--log-format json`: one JSON object per line, with the access log's fields
  (api/access_log.py) as keys of their own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import trio

OWN = "exo_trio"
# Cluster detail, quiet on a lone node unless asked for.
CLUSTER_LOGGERS = ("exo_trio.cluster", "exo_trio.shard_manager", "exo_trio.net")
# Libraries that say too much at INFO (huggingface_hub's HTTP client logs every
# request): WARNING unless --log-level asks.
NOISY_LIBRARIES = ("httpx2",)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A load shorter than this shows no progress bar.
PROGRESS_AFTER = 1.0
BAR_WIDTH = 30


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def parse_levels(spec: str) -> dict[str, int]:
    """'info,trio_websocket=debug' -> {'': INFO, 'trio_websocket': DEBUG}."""
    levels: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, level = item.rpartition("=")
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise ValueError(f"unknown log level {level!r} in {spec!r}")
        levels[name] = value
    return levels


def setup_logging(
    verbose: bool,
    levels: str | None,
    fmt: str,
    *,
    lone: bool,
    stream: TextIO | None = None,
) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if lone and not verbose and not levels:
        for name in CLUSTER_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if not levels:
        for name in NOISY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
    if verbose:
        logging.getLogger(OWN).setLevel(logging.DEBUG)
    if levels:
        try:
            parsed = parse_levels(levels)
        except ValueError as exc:
            from exo_trio.cli_config import fail

            fail(f"--log-level: {exc}")
        for name, level in parsed.items():
            logging.getLogger(name or None).setLevel(level)


class LoadProgress:
    """One progress bar on a terminal for a model load that takes longer than
    PROGRESS_AFTER seconds, redrawn in place; nothing on a non-terminal (the log
    says when the load started and how long it took)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.drawn = False

    def draw(self, model: str, fraction: float, phase: str) -> None:
        if not self.stream.isatty():
            return
        filled = int(BAR_WIDTH * max(0.0, min(1.0, fraction)))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(f"\rloading {model} [{bar}] {fraction:4.0%} {phase[:24]:<24}")
        self.stream.flush()
        self.drawn = True

    def end(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


async def announce(
    model: str,
    urls: list[str],
    ready: Callable[[], bool],
    load_state: Callable[[], tuple[str, float, str] | None],
    progress: LoadProgress | None = None,
) -> None:
    """Show loads as they happen and, once the model first serves, the URL line.

    `load_state` gives the local runner's (state, fraction, phase), or None when
    this node runs no runner of the model (it is served elsewhere)."""
    log = logging.getLogger(OWN)
    progress = progress or LoadProgress()
    announced = False
    loading_since: float | None = None
    while True:
        state = load_state()
        now = trio.current_time()
        if state is not None and state[0] == "loading":
            if loading_since is None:
                loading_since = now
                log.info("loading model %s", model)
            if now - loading_since >= PROGRESS_AFTER:
                progress.draw(model, state[1], state[2])
        elif loading_since is not None:
            progress.end()
            if state is not None and state[0] == "ready":
                log.info("model %s loaded in %.1fs", model, now - loading_since)
            loading_since = None
        if ready() and not announced:
            announced = True
            for url in urls:
                log.info("ready: serving %s at %s (OpenAI base URL %s/v1)", model, url, url)
        await trio.sleep(0.1)
