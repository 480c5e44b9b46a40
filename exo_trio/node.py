"""The node: one model, its worker, the streams registry and the request lifecycle.

`Node.open_generation` is the only way a request reaches a runner, and it is where
the project's central rule lives: the request's channel is registered *before* its
command is dispatched, with no scheduling point in between, and on the way out
(finished, failed, client gone, server shutting down) the work is cancelled and the
channel closed and unregistered in `finally`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from exo_trio.metrics import Metrics, NodeSnapshot
from exo_trio.prompts import PromptEncoder
from exo_trio.seams import Seams
from exo_trio.streams import RequestStream, StreamRegistry
from exo_trio.types import TextGeneration
from exo_trio.worker import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    id: str
    context_length: int
    created: int
    owned_by: str = "exo-trio"
    # Descriptive only (Ollama's /api/tags and /api/show): the HF model_type, the
    # weights' size on disk, and a digest of the model's files.
    architecture: str = ""
    size_bytes: int = 0
    digest: str = ""


class Node:
    def __init__(
        self,
        *,
        model: ModelCard,
        encoder: PromptEncoder,
        worker: Worker,
        registry: StreamRegistry,
        seams: Seams,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.worker = worker
        self.registry = registry
        self.seams = seams
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.metrics_snapshot)

    def models(self) -> list[ModelCard]:
        return [self.model]

    def find_model(self, model_id: str) -> ModelCard | None:
        return next((m for m in self.models() if m.id == model_id), None)

    @contextmanager
    def open_generation(self, command: TextGeneration) -> Iterator[RequestStream]:
        """Register the request's channel, then dispatch it; yield the stream.

        Synchronous on purpose: between `registry.open` and `worker.submit` nothing
        can run, so no event can arrive for an id that has no channel. Raises
        RunnerUnavailable (with nothing left registered) if no runner can take it.
        """
        stream = self.registry.open(command.request_id, command.params.max_tokens)
        try:
            self.worker.submit(command)
            yield stream
        finally:
            if not stream.finished:
                # The client went away, the server is stopping, or the consumer
                # failed: the runner must stop spending steps on it.
                self.worker.cancel(command.request_id)
            self.registry.close(command.request_id)

    def cancel_request(self, request_id: str) -> bool:
        """End an in-flight request by the id its client saw (POST /v1/cancel).

        The client's stream gets a `cancelled` terminal event (so it ends now, in
        its dialect's error shape) and the runner is told to drop the work. False
        if no such request is open here.
        """
        if not self.registry.cancel(request_id, "The request was cancelled."):
            return False
        self.worker.cancel(request_id)
        return True

    def metrics_snapshot(self) -> NodeSnapshot:
        info = self.worker.ready_info
        stats = self.registry.stats
        return NodeSnapshot(
            runner_ready=self.worker.ready,
            runner_active=len(self.worker.jobs),
            max_batch=info.max_batch if info is not None else 0,
            runner_restarts=self.worker.stats.restarts,
            open_streams=len(self.registry),
            unknown_events=stats.unknown_events,
            late_events=stats.late_events,
            after_terminal_events=stats.after_terminal,
        )

    def health(self) -> tuple[bool, dict[str, object]]:
        worker = self.worker.health()
        ok = self.worker.ready
        reason = None if ok else self.worker.unavailable_reason()
        return ok, {
            "status": "ok" if ok else "unavailable",
            "reason": reason,
            "model": self.model.id,
            "runner": worker,
            "open_streams": len(self.registry),
            "late_events": self.registry.stats.late_events,
            "unknown_events": self.registry.stats.unknown_events,
        }
