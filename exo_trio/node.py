"""The node: its models, the streams registry and the request lifecycle.

`Node.open_generation` is the only way a request reaches a runner, and it is where
the project's central rule lives: the request's channel is registered *before* its
command is dispatched, with no scheduling point in between, and on the way out
(finished, failed, client gone, server shutting down) the work is cancelled and the
channel closed and unregistered in `finally`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from exo_trio.metrics import Metrics, NodeSnapshot
from exo_trio.prompts import PromptEncoder
from exo_trio.seams import Seams
from exo_trio.streams import RequestStream, StreamRegistry
from exo_trio.types import GenerationFailed, TextGeneration
from exo_trio.worker import Worker

if TYPE_CHECKING:
    from exo_trio.model_catalog import ModelCatalog

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
    # Token ids must be below this (prompt ids, logit_bias keys); 0 = unknown.
    vocab_size: int = 0


@dataclass(frozen=True)
class ServedModel:
    """What the node needs to take requests for a model: its card and tokenizer."""

    card: ModelCard
    encoder: PromptEncoder


# What became of a cancel by id: done, no node has the request, or a node that
# might have it could not be asked.
CancelOutcome = Literal["cancelled", "absent", "unknown"]


class Dispatcher(Protocol):
    """Where registered requests go: the node's Router (router.py), or in unit
    tests one local worker (WorkerDispatcher)."""

    def dispatch(self, command: TextGeneration) -> object:
        """Hand the command to a runner (synchronously). Returns a handle for
        `cancel`; raises RunnerUnavailable if nothing can take it."""
        ...

    def cancel(self, request_id: str, handle: object) -> None: ...

    def finished(self, request_id: str) -> None: ...

    def ready(self, model_id: str) -> bool: ...

    def unavailable_reason(self, model_id: str) -> str: ...

    def placed_models(self) -> list[str]:
        """The models with a live instance (placing, downloading, loading, ready)."""
        ...

    def local_worker(self, model_id: str) -> Worker | None:
        """The worker of this node's runner for the model (health, metrics)."""
        ...

    def accept_cancels(self, cancel: Callable[[str], bool]) -> None:
        """Other nodes' cancels of requests this node owns are applied by `cancel`."""
        ...

    async def cancel_elsewhere(self, request_id: str) -> CancelOutcome:
        """Cancel a request another node owns: "cancelled", "absent" (no node has
        it) or "unknown" (a node could not be asked)."""
        ...


class WorkerDispatcher:
    """A node on its own: every request goes to its one local worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def dispatch(self, command: TextGeneration) -> object:
        self.worker.submit(command)
        return None

    def cancel(self, request_id: str, handle: object) -> None:
        self.worker.cancel(request_id)

    def finished(self, request_id: str) -> None:
        return None

    def ready(self, model_id: str) -> bool:
        return self.worker.ready

    def unavailable_reason(self, model_id: str) -> str:
        return self.worker.unavailable_reason()

    def placed_models(self) -> list[str]:
        return []  # only the node's own model, which it always serves

    def local_worker(self, model_id: str) -> Worker | None:
        return self.worker

    def accept_cancels(self, cancel: Callable[[str], bool]) -> None:
        return None  # no other node

    async def cancel_elsewhere(self, request_id: str) -> CancelOutcome:
        return "absent"


class Node:
    def __init__(
        self,
        *,
        registry: StreamRegistry,
        seams: Seams,
        model: ModelCard | None = None,
        encoder: PromptEncoder | None = None,
        served: Sequence[ServedModel] = (),
        worker: Worker | None = None,
        dispatcher: Dispatcher | None = None,
        metrics: Metrics | None = None,
        catalog: ModelCatalog | None = None,
    ) -> None:
        """Give either a `dispatcher` (the Router, as assembly.py builds every
        node) or one local `worker` (unit tests of the request lifecycle).

        The models the node was started with (`model` and its `encoder`, and those
        in `served`) are always offered; with a `catalog` (the model store,
        downloads, and the cards of models placed at run time) every other model
        placed in the cluster is too, while it has an instance. Without a catalog
        the model-management endpoints answer 404."""
        if dispatcher is None:
            if worker is None:
                raise ValueError("a Node needs a worker or a dispatcher")
            dispatcher = WorkerDispatcher(worker)
        pinned = list(served)
        if model is not None:
            pinned.insert(0, ServedModel(model, encoder))  # type: ignore[arg-type]
        self._pinned = {s.card.id: s for s in pinned}
        # The node's first model: the one /health and the runner metrics follow.
        self.model: ModelCard | None = pinned[0].card if pinned else None
        self.dispatcher: Dispatcher = dispatcher
        self.registry = registry
        self.seams = seams
        self.catalog = catalog
        # Handles of the requests in flight, for cancel_request; and the ids their
        # clients gave them (X-Request-Id), another name to cancel them by.
        self._handles: dict[str, object] = {}
        self._client_ids: dict[str, str] = {}
        # Shutting down (exo_trio/shutdown.py): new requests are refused with a 503,
        # /health says so. `exchanges` counts the generation HTTP exchanges admitted
        # and not yet ended (api/admission.py), which the drain waits for.
        self.draining = False
        self.exchanges = 0
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.metrics_snapshot)
        dispatcher.accept_cancels(self.cancel_request)

    def served(self) -> dict[str, ServedModel]:
        """The models this node takes requests for, by name."""
        served = dict(self._pinned)
        if self.catalog is not None:
            for name in self.dispatcher.placed_models():
                entry = self.catalog.cards.get(name)
                if entry is not None:
                    served.setdefault(name, entry)
        return served

    def models(self) -> list[ModelCard]:
        return [entry.card for entry in self.served().values()]

    def find_model(self, model_id: str) -> ModelCard | None:
        entry = self.served().get(model_id)
        return entry.card if entry is not None else None

    def encoder_for(self, model_id: str) -> PromptEncoder:
        """The tokenizer of a model this node serves (Ollama's `:latest` ignored)."""
        served = self.served()
        entry = served.get(model_id) or served[model_id.removesuffix(":latest")]
        return entry.encoder

    @contextmanager
    def open_generation(self, command: TextGeneration) -> Iterator[RequestStream]:
        """Register the request's channel, then dispatch it; yield the stream.

        Synchronous on purpose: between `registry.open` and `worker.submit` nothing
        can run, so no event can arrive for an id that has no channel. Raises
        RunnerUnavailable (with nothing left registered) if no runner can take it.
        """
        rid, client_id = command.request_id, command.client_id
        if client_id is not None and client_id in self._client_ids:
            raise ValueError(f"a request with client id {client_id!r} is in flight")
        stream = self.registry.open(rid, command.params.max_tokens)
        dispatched = False
        try:
            self._handles[rid] = self.dispatcher.dispatch(command)
            dispatched = True
            if client_id is not None:
                self._client_ids[client_id] = rid
            yield stream
        finally:
            if client_id is not None and self._client_ids.get(client_id) == rid:
                del self._client_ids[client_id]
            handle = self._handles.pop(rid, None)
            if dispatched:
                if stream.finished:
                    self.dispatcher.finished(rid)
                    how = "failed" if isinstance(stream.terminal, GenerationFailed) else "finished"
                else:
                    # The client went away, the server is stopping, or the consumer
                    # failed: the runner must stop spending steps on it.
                    self.dispatcher.cancel(rid, handle)
                    how = "mid_stream" if stream.chunks_received else "before_first"
                self.seams.observer.request_ended(rid, how)
            self.registry.close(rid)

    def open_ids(self) -> list[str]:
        """The requests this node holds open, and the client ids naming them."""
        return sorted([*self._handles, *(f"client id {c}" for c in self._client_ids)])

    def client_id_in_use(self, client_id: str) -> bool:
        return client_id in self._client_ids

    def cancel_request(self, request_id: str) -> bool:
        """End an in-flight request by the id its client saw or gave it (POST
        /v1/cancel).

        The client's stream gets a `cancelled` terminal event (so it ends now, in
        its dialect's error shape) and the runner is told to drop the work. False
        if no such request is open here.
        """
        request_id = self._client_ids.get(request_id, request_id)
        if request_id not in self._handles:
            return False
        if not self.registry.cancel(request_id, "The request was cancelled."):
            return False
        self.dispatcher.cancel(request_id, self._handles[request_id])
        return True

    def end_all(self, message: str) -> int:
        """End every open request now, each with a `shutting_down` failure (its
        dialect's error event, or a 503), and stop its runner work. Returns how many."""
        ended = 0
        for request_id, handle in list(self._handles.items()):
            if self.registry.cancel(request_id, message, kind="shutting_down"):
                self.dispatcher.cancel(request_id, handle)
                ended += 1
        return ended

    async def cancel_anywhere(self, request_id: str) -> CancelOutcome:
        """cancel_request here, or else on the node of the cluster that owns it (a
        client may reach the cluster through any node)."""
        if self.cancel_request(request_id):
            return "cancelled"
        return await self.dispatcher.cancel_elsewhere(request_id)

    def ready(self, model_id: str) -> bool:
        return self.dispatcher.ready(model_id)

    def unavailable_reason(self, model_id: str) -> str:
        return self.dispatcher.unavailable_reason(model_id)

    def model_failure(self, model_id: str) -> str | None:
        """Why the model will not be served until someone acts (its runner here gave
        up loading it), or None."""
        worker = self.dispatcher.local_worker(model_id)
        return worker.gave_up if worker is not None else None

    def local_worker(self) -> Worker | None:
        """The runner on this node serving the node's model, if there is one."""
        return self.dispatcher.local_worker(self.model.id) if self.model is not None else None

    def pinned_ready(self) -> bool:
        """Every model the node was started with can take requests now."""
        return all(self.ready(name) for name in self._pinned)

    def metrics_snapshot(self) -> NodeSnapshot:
        worker = self.local_worker()
        info = worker.ready_info if worker is not None else None
        stats = self.registry.statistics()
        return NodeSnapshot(
            runner_ready=self.pinned_ready(),
            runner_active=len(worker.jobs) if worker is not None else 0,
            max_batch=info.max_batch if info is not None else 0,
            runner_restarts=worker.stats.restarts if worker is not None else 0,
            open_streams=len(stats.open_ids),
            unknown_events=stats.unknown_events,
            late_events=stats.late_events,
            after_terminal_events=stats.after_terminal,
            prompt_cache=worker.prompt_cache if worker is not None else None,
        )

    def health(self) -> tuple[bool, dict[str, object]]:
        """Healthy when requests for every model the node was started with can be
        served now (a node started with none is healthy when it runs), and it is
        not shutting down."""
        ok = self.pinned_ready() and not self.draining
        waiting = [name for name in self._pinned if not self.ready(name)]
        worker = self.local_worker()
        if self.draining:
            status, reason = "draining", f"shutting down: {self.exchanges} request(s) in flight"
        elif ok:
            status, reason = "ok", None
        else:
            status = "unavailable"
            reason = self.model_failure(waiting[0]) or self.unavailable_reason(waiting[0])
        stats = self.registry.statistics()
        return ok, {
            "status": status,
            "reason": reason,
            "model": self.model.id if self.model is not None else None,
            "models": {name: self.ready(name) for name in self.served()},
            "runner": worker.health() if worker is not None else None,
            "open_streams": len(stats.open_ids),
            "late_events": stats.late_events,
            "unknown_events": stats.unknown_events,
        }
