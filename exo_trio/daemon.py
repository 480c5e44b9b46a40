"""Assembling and running one node: model, runner supervision, HTTP API."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from exo_trio.api.app import ApiSettings, create_app
from exo_trio.api.auth import check_exposure
from exo_trio.demo_model import DEMO_MODEL_ID, ensure_demo_model
from exo_trio.model_info import describe_model_dir
from exo_trio.node import ModelCard, Node
from exo_trio.process_runner import process_launcher
from exo_trio.prompts import HFPromptEncoder, context_length
from exo_trio.seams import Seams
from exo_trio.streams import StreamRegistry
from exo_trio.worker import Worker

log = logging.getLogger("exo_trio")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "exo-trio"


@dataclass
class NodeConfig:
    model_path: Path | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 52415
    data_dir: Path = field(default_factory=default_data_dir)
    max_batch: int = 16
    api: ApiSettings = field(default_factory=ApiSettings)
    # Serve a non-loopback address without an API key (see api/auth.py).
    insecure_no_api_key: bool = False


def resolve_model(config: NodeConfig) -> tuple[str, Path]:
    """The model to serve: the given directory (id = its name), or the demo model."""
    if config.model_path is None:
        log.info("no --model given: serving the built-in demo model")
        return DEMO_MODEL_ID, ensure_demo_model(config.data_dir)
    path = config.model_path.expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"exo-trio: {path} is not an MLX model directory (no config.json)")
    return path.name, path


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_node(config: NodeConfig) -> None:
    check_exposure(config.api_host, config.api, config.insecure_no_api_key)
    model_id, model_path = resolve_model(config)
    log.info("model %s from %s", model_id, model_path)
    log.info("loading tokenizer")
    encoder = HFPromptEncoder(model_path)
    seams = Seams()
    registry = StreamRegistry()
    worker = Worker(process_launcher(model_path, model_id, config.max_batch), registry.deliver)
    facts = describe_model_dir(model_path)
    card = ModelCard(
        id=model_id,
        context_length=context_length(model_path),
        created=int(seams.wall_clock()),
        architecture=facts.architecture,
        size_bytes=facts.size_bytes,
        digest=facts.digest,
        vocab_size=facts.vocab_size,
    )
    node = Node(model=card, encoder=encoder, worker=worker, registry=registry, seams=seams)
    app = create_app(node, config.api)

    hconfig = HypercornConfig()
    hconfig.bind = [bind_address(config.api_host, config.api_port)]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("hypercorn.error")
    hconfig.graceful_timeout = 2.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
        nursery.start_soon(worker.run)
        binds = await nursery.start(serve, app, hconfig)
        for url in binds:
            log.info("API listening on %s (OpenAI base URL %s/v1)", url, url)
    log.info("node stopped")


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Ctrl-C or SIGTERM: cancel everything; runners are stopped on the way out."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
