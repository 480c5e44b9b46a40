"""The request lifecycle every dialect shares: validate, register, dispatch, relay.

Each dialect adapter parses its request into a TextGeneration and encodes events
back; the steps in between are here, once. `events` registers the request's
channel and dispatches it (Node.open_generation) on its first iteration and runs
inside the HTTP request's task, which quart-trio cancels when the client goes
away; the `with` block then cancels the runner's work and unregisters the channel.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, aclosing
from dataclasses import dataclass, field

import msgspec
import trio
from quart import Response, request

from exo_trio.api.access_log import note_generation
from exo_trio.api.errors import ApiError
from exo_trio.api.sampling import MAX_TOKEN_ID
from exo_trio.api.timeouts import RequestTimeouts, timed_out
from exo_trio.node import ModelCard, Node
from exo_trio.types import (
    ChunkGenerated,
    FinishReason,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)
from exo_trio.worker import RunnerUnavailable

# Every generation response names its request, so any client (also Ollama's,
# whose bodies carry no id) can pass it to POST /v1/cancel/{id}.
REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def find_model(node: Node, model_id: str) -> ModelCard:
    model = node.find_model(model_id)
    if model is None:
        loaded = ", ".join(m.id for m in node.models()) or "none"
        hint = ""
        if node.catalog is not None and model_id in node.catalog.infos:
            hint = (
                f" `{model_id}` is in the store but not loaded: load it with POST "
                f'/v1/instances {{"model": "{model_id}"}} or `exo-trio run {model_id}`.'
            )
        raise ApiError(
            404,
            f"The model `{model_id}` does not exist. Available: {loaded}.{hint}",
            param="model",
            code="model_not_found",
        )
    return model


def client_request_id() -> str | None:
    """The X-Request-Id the client sent with this request, checked: letters,
    digits and `._:-`, at most 128 characters (it goes into URLs and logs)."""
    value = request.headers.get(REQUEST_ID_HEADER)
    if value is None:
        return None
    if not CLIENT_ID.fullmatch(value):
        raise ApiError(
            400,
            f"{REQUEST_ID_HEADER} must be 1-128 letters, digits or `._:-`.",
            param=REQUEST_ID_HEADER,
        )
    return value


def plan_generation(
    node: Node,
    model: ModelCard,
    prompt_tokens: list[int],
    params: SamplingParams,
    request_id: str,
    prompt_param: str = "messages",
    client_id: str | None = None,
) -> TextGeneration:
    """Check the request against the model and build the command. Pure checks only:
    a request that fails here never reaches a runner."""
    if not prompt_tokens:
        raise ApiError(400, "The prompt is empty.", param=prompt_param)
    if params.max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1.", param="max_tokens")
    if len(prompt_tokens) + params.max_tokens > model.context_length:
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens. "
            f"However, you requested {len(prompt_tokens) + params.max_tokens} tokens "
            f"({len(prompt_tokens)} in the {prompt_param}, {params.max_tokens} in the "
            "completion).",
            param=prompt_param,
            code="context_length_exceeded",
        )
    # Out-of-range ids would only be refused by the runner, after a 200 for a
    # streaming client: refuse them here (token-id prompts, logit_bias keys). With
    # the vocabulary unknown, still keep them to what the runner protocol carries.
    limit = model.vocab_size or MAX_TOKEN_ID + 1
    for where, ids in ((prompt_param, prompt_tokens), ("logit_bias", params.logit_bias)):
        bad = [t for t in ids if not 0 <= t < limit]
        if bad:
            raise ApiError(
                400,
                f"Token ids must be in [0, {limit}); got {bad[:5]}.",
                param=where,
            )
    return TextGeneration(
        request_id=request_id,
        model=model.id,
        prompt_tokens=prompt_tokens,
        params=params,
        client_id=client_id,
    )


def default_max_tokens(model: ModelCard, prompt_tokens: list[int]) -> int:
    """With no max_tokens, generate up to the end of the context window."""
    return max(1, model.context_length - len(prompt_tokens))


def check_available(node: Node, model_id: str) -> None:
    """Refuse up front (503) when no runner can take work, so a streaming client
    gets a proper status instead of a 200 followed by an error event."""
    if node.draining:
        raise ApiError(
            503,
            "The node is shutting down; send the request to another node.",
            type="server_error",
            code="shutting_down",
        )
    if not node.ready(model_id):
        raise ApiError(
            503,
            node.unavailable_reason(model_id),
            type="server_error",
            code="runner_unavailable",
        )


@dataclass
class Timing:
    """When a request's milestones happened, on Trio's clock (never wall time)."""

    started: float = field(default_factory=trio.current_time)
    first_token: float | None = None
    last_token: float | None = None
    ended: float | None = None

    def token(self, now: float) -> tuple[float | None, float | None]:
        """Record a token; returns (time to first token, gap since the previous)."""
        ttft = gap = None
        if self.first_token is None:
            self.first_token = now
            ttft = now - self.started
        else:
            gap = now - (self.last_token or now)
        self.last_token = now
        return ttft, gap

    @property
    def prefill_seconds(self) -> float:
        """Until the first token (prefill and queueing), or the whole request."""
        end = self.first_token or self.ended or trio.current_time()
        return end - self.started

    @property
    def decode_seconds(self) -> float:
        """From the first token to the end."""
        if self.first_token is None:
            return 0.0
        return (self.ended or trio.current_time()) - self.first_token

    @property
    def total_seconds(self) -> float:
        return (self.ended or trio.current_time()) - self.started


async def events(
    node: Node,
    command: TextGeneration,
    keepalive: float | None = None,
    timing: Timing | None = None,
    timeouts: RequestTimeouts | None = None,
) -> AsyncIterator[GenerationEvent | None]:
    """Register, dispatch, and yield the request's events up to and including its
    terminal event. Yields None after `keepalive` seconds without an event (so
    streaming dialects can send a keep-alive while a long prompt is prefilled).
    Records milestones in `timing` and the node's metrics as events pass.

    When one of `timeouts` passes (no first token, no token for a while, too long
    overall) the request ends here with a GenerationFailed(kind="timeout") as its
    terminal event, which every dialect renders as its error; leaving the
    `with` block below then cancels the runner's work like any other early end."""
    timing = timing if timing is not None else Timing()
    limits = timeouts if timeouts is not None else RequestTimeouts.off()
    try:
        generation = node.open_generation(command)
        stream = generation.__enter__()
    except RunnerUnavailable as exc:
        refused = GenerationFailed(
            request_id=command.request_id, kind="runner_unavailable", message=str(exc)
        )
        node.seams.observer.request_failed(refused)
        yield refused
        return
    except ValueError as exc:  # its X-Request-Id was taken since begin() checked
        yield GenerationFailed(request_id=command.request_id, kind="invalid", message=str(exc))
        return
    closed = False
    try:
        await node.seams.faults.hit("after_dispatch", command.request_id)
        while not stream.finished:
            deadline = limits.next_deadline(timing)
            wake = deadline.at if deadline is not None else math.inf
            if keepalive is not None:
                wake = min(wake, trio.current_time() + keepalive)
            event = None
            with trio.move_on_at(wake):
                event = await stream.receive()
            if event is None and deadline is not None and deadline.kind != "total":
                # The first-token and idle limits measure the runner's progress: an
                # event already in the channel is progress, however late this reads it.
                event = stream.poll()
            if event is None and deadline is not None and trio.current_time() >= deadline.at:
                node.seams.observer.timed_out(command.request_id, deadline.kind)
                failed = timed_out(command.request_id, deadline)
                observe(node, command, timing, failed)
                closed = stop_now(generation)
                yield failed
                return
            if event is not None:
                observe(node, command, timing, event)
            # Yield outside the cancel scope: a suspended generator must not hold one.
            yield event
    finally:
        if not closed:
            generation.__exit__(None, None, None)
        note_generation(
            command, timing.started, timing.first_token, stream.chunks_received, stream.terminal
        )


def stop_now(generation: AbstractContextManager[object]) -> bool:
    """End a timed-out request's generation (its runner work cancelled, its channel
    closed) now, not once its client has been sent the error (which a slow client
    can make take long). Returns True: it is closed."""
    generation.__exit__(None, None, None)
    return True


def observe(node: Node, command: TextGeneration, timing: Timing, event: GenerationEvent) -> None:
    now = trio.current_time()
    if isinstance(event, ChunkGenerated):
        ttft, gap = timing.token(now)
        node.metrics.observe_token(command.model, ttft, gap)
    else:
        timing.ended = now
        node.metrics.observe_end(command.model, event)


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None
    timing: Timing
    chunks: list[ChunkGenerated] = field(default_factory=list)  # for their logprobs
    cached_tokens: int = 0  # prompt tokens the runner's prefix cache supplied


async def complete(
    node: Node, command: TextGeneration, timeouts: RequestTimeouts | None = None
) -> Completion:
    """Run a request to its end and return the whole text (non-streaming dialects)."""
    parts: list[str] = []
    chunks: list[ChunkGenerated] = []
    timing = Timing()
    # aclosing: the request ends (its `with` block runs) here, not when the
    # generator is collected, also when a failure raises out of the loop.
    async with aclosing(events(node, command, timing=timing, timeouts=timeouts)) as stream:
        async for event in stream:
            if isinstance(event, ChunkGenerated):
                parts.append(event.text)
                chunks.append(event)
            elif isinstance(event, GenerationFinished):
                parts.append(event.text)
                return Completion(
                    "".join(parts),
                    event.finish_reason,
                    event.prompt_tokens,
                    event.completion_tokens,
                    event.stop_sequence,
                    timing,
                    chunks,
                    event.cached_tokens,
                )
            elif isinstance(event, GenerationFailed):
                raise failure_error(event)
    raise AssertionError("a request stream ended without a terminal event")


def streaming_response(
    body: AsyncIterator[bytes], command: TextGeneration, content_type: str
) -> Response:
    return Response(
        body,
        content_type=content_type,
        headers={
            "Cache-Control": "no-cache",
            # Tell proxies (nginx) not to buffer: tokens must reach the client as made.
            "X-Accel-Buffering": "no",
            # Our id, as OpenAI's API answers with its own; one the client gave
            # (command.client_id) cancels the request just as well.
            REQUEST_ID_HEADER: command.request_id,
        },
    )


def json_response(payload: dict[str, object], command: TextGeneration) -> Response:
    return Response(
        msgspec.json.encode(payload),
        content_type="application/json",
        headers={REQUEST_ID_HEADER: command.request_id},
    )


def failure_error(event: GenerationFailed) -> ApiError:
    if event.kind == "invalid":
        return ApiError(400, event.message)
    if event.kind == "runner_unavailable":
        return ApiError(503, event.message, type="server_error", code="runner_unavailable")
    if event.kind == "cancelled":
        return ApiError(499, "The request was cancelled.", type="cancelled", code="cancelled")
    if event.kind == "shutting_down":
        return ApiError(503, event.message, type="server_error", code="shutting_down")
    if event.kind == "timeout":
        # The node gave up waiting on its own runner: a gateway timeout, not a 500.
        return ApiError(504, event.message, type="server_error", code="timeout")
    return ApiError(500, event.message, type="server_error", code=event.kind)
