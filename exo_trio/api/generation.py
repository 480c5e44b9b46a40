"""The request lifecycle every dialect shares: validate, register, dispatch, relay.

Each dialect adapter parses its request into a TextGeneration and encodes events
back; the steps in between are here, once. `events` registers the request's
channel and dispatches it (Node.open_generation) on its first iteration and runs
inside the HTTP request's task, which quart-trio cancels when the client goes
away; the `with` block then cancels the runner's work and unregisters the channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from exo_trio.api.errors import ApiError
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

# OpenAI's logit_bias of -100 means "ban"; make it a hard ban, not a large penalty.
BAN = -1e9


def find_model(node: Node, model_id: str) -> ModelCard:
    model = node.find_model(model_id)
    if model is None:
        raise ApiError(
            404,
            f"The model `{model_id}` does not exist. Available: "
            + ", ".join(m.id for m in node.models()),
            param="model",
            code="model_not_found",
        )
    return model


def plan_generation(
    node: Node,
    model: ModelCard,
    prompt_tokens: list[int],
    params: SamplingParams,
    request_id: str,
) -> TextGeneration:
    """Check the request against the model and build the command. Pure checks only:
    a request that fails here never reaches a runner."""
    if not prompt_tokens:
        raise ApiError(400, "The prompt is empty.", param="messages")
    if params.max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1.", param="max_tokens")
    if len(prompt_tokens) + params.max_tokens > model.context_length:
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens. "
            f"However, you requested {len(prompt_tokens) + params.max_tokens} tokens "
            f"({len(prompt_tokens)} in the messages, {params.max_tokens} in the completion).",
            param="messages",
            code="context_length_exceeded",
        )
    return TextGeneration(
        request_id=request_id, model=model.id, prompt_tokens=prompt_tokens, params=params
    )


def default_max_tokens(model: ModelCard, prompt_tokens: list[int]) -> int:
    """With no max_tokens, generate up to the end of the context window."""
    return max(1, model.context_length - len(prompt_tokens))


def check_available(node: Node) -> None:
    """Refuse up front (503) when no runner can take work, so a streaming client
    gets a proper status instead of a 200 followed by an error event."""
    if not node.worker.ready:
        raise ApiError(
            503, node.worker.unavailable_reason(), type="server_error", code="runner_unavailable"
        )


async def events(
    node: Node, command: TextGeneration, keepalive: float | None = None
) -> AsyncIterator[GenerationEvent | None]:
    """Register, dispatch, and yield the request's events up to and including its
    terminal event. Yields None after `keepalive` seconds without an event (so
    streaming dialects can send a keep-alive while a long prompt is prefilled)."""
    try:
        generation = node.open_generation(command)
        stream = generation.__enter__()
    except RunnerUnavailable as exc:
        yield GenerationFailed(
            request_id=command.request_id, kind="runner_unavailable", message=str(exc)
        )
        return
    try:
        await node.seams.faults.hit("after_dispatch", command.request_id)
        while not stream.finished:
            if keepalive is None:
                event = await stream.receive()
            else:
                event = None
                with trio.move_on_after(keepalive):
                    event = await stream.receive()
            # Yield outside the cancel scope: a suspended generator must not hold one.
            yield event
    finally:
        generation.__exit__(None, None, None)


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


async def complete(node: Node, command: TextGeneration) -> Completion:
    """Run a request to its end and return the whole text (non-streaming dialects)."""
    parts: list[str] = []
    async for event in events(node, command):
        if isinstance(event, ChunkGenerated):
            parts.append(event.text)
        elif isinstance(event, GenerationFinished):
            parts.append(event.text)
            return Completion(
                "".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens
            )
        elif isinstance(event, GenerationFailed):
            raise failure_error(event)
    raise AssertionError("a request stream ended without a terminal event")


def failure_error(event: GenerationFailed) -> ApiError:
    if event.kind == "invalid":
        return ApiError(400, event.message)
    if event.kind == "runner_unavailable":
        return ApiError(503, event.message, type="server_error", code="runner_unavailable")
    if event.kind == "cancelled":
        return ApiError(499, "The request was cancelled.", type="cancelled", code="cancelled")
    return ApiError(500, event.message, type="server_error", code=event.kind)
