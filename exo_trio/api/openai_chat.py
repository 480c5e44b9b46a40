"""OpenAI chat completions: POST /v1/chat/completions, streaming and not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import msgspec
from quart import Response, request

from exo_trio.api.errors import ApiError, decode_body, openai_error_body
from exo_trio.api.generation import (
    BAN,
    check_available,
    complete,
    default_max_tokens,
    events,
    failure_error,
    find_model,
    plan_generation,
)
from exo_trio.api.sse import DONE, KEEPALIVE, sse_data
from exo_trio.node import Node
from exo_trio.types import (
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    # Extension (as in vLLM): keep generating past EOS, for exact-length benchmarks.
    ignore_eos: bool = False


def message_text(message: ChatMessage, index: int) -> str:
    """Flatten string or content-part content to the text the chat template sees."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"Content part type `{part.type}` is not supported; only `text` parts are.",
                param=f"messages[{index}].content[{j}]",
            )
        texts.append(part.text)
    return "".join(texts)


def sampling_params(body: ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, "temperature must be between 0 and 2.", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "top_p must be greater than 0 and at most 1.", param="top_p")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes at most 4 non-empty strings.", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=body.seed,
        stop=tuple(stop),
        logit_bias=parse_logit_bias(body.logit_bias),
        ignore_eos=body.ignore_eos,
    )


def parse_logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(
                400, f"logit_bias key `{key}` is not a token id.", param="logit_bias"
            ) from None
        if not -100.0 <= value <= 100.0:
            raise ApiError(400, "logit_bias values must be in [-100, 100].", param="logit_bias")
        bias[token] = BAN if value <= -100.0 else value
    return bias


def parse_chat_request(node: Node, raw: bytes) -> tuple[ChatCompletionRequest, TextGeneration]:
    body = decode_body(raw, ChatCompletionRequest)
    if not body.messages:
        raise ApiError(400, "messages must contain at least one message.", param="messages")
    if body.n not in (None, 1):
        raise ApiError(400, "Only n=1 is supported.", param="n")
    model = find_model(node, body.model)
    messages = [
        {"role": m.role, "content": message_text(m, i)} for i, m in enumerate(body.messages)
    ]
    prompt = node.encoder.chat_tokens(messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(model, prompt)
    params = sampling_params(body, max_tokens)
    request_id = node.seams.new_id("chatcmpl")
    return body, plan_generation(node, model, prompt, params, request_id)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def chat_completions(node: Node, keepalive: float) -> Response | dict[str, object]:
    raw = await request.get_data(cache=False)
    body, command = parse_chat_request(node, raw)
    check_available(node)
    created = int(node.seams.wall_clock())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = stream_chat(node, command, created, include_usage, keepalive)
        return Response(
            stream,
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    result = await complete(node, command)
    return {
        "id": command.request_id,
        "object": "chat.completion",
        "created": created,
        "model": command.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


async def stream_chat(
    node: Node, command: TextGeneration, created: int, include_usage: bool, keepalive: float
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        payload: dict[str, object] = {
            "id": command.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": command.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            payload["usage"] = None
        return sse_data(payload)

    first = True
    async for event in events(node, command, keepalive):
        if first:
            await node.seams.faults.hit("before_first_write", command.request_id)
            yield chunk({"role": "assistant", "content": ""})
            first = False
        if event is None:
            yield KEEPALIVE
        elif isinstance(event, ChunkGenerated):
            if event.text:
                yield chunk({"content": event.text})
        elif isinstance(event, GenerationFinished):
            if event.text:
                yield chunk({"content": event.text})
            yield chunk({}, event.finish_reason)
            if include_usage:
                yield sse_data(
                    {
                        "id": command.request_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": command.model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": usage(event.prompt_tokens, event.completion_tokens),
                    }
                )
            yield DONE
        elif isinstance(event, GenerationFailed):
            # After a 200 the only way to report an error is in the stream; the
            # openai client raises APIError on a `data: {"error": ...}` event.
            yield sse_data(openai_error_body(failure_error(event)))
