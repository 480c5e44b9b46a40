"""Anthropic messages: POST /v1/messages (streaming and not) and
POST /v1/messages/count_tokens.

The system prompt becomes a leading system message and goes through the model's
chat template like every other dialect's, so the same conversation gives the same
prompt tokens here as through chat completions. Text content only: image,
document and tool blocks are refused with a 400, and so are tools.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from quart import Response

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, anthropic_error_body, decode_body
from exo_trio.api.generation import (
    Timing,
    client_request_id,
    failure_error,
    find_model,
    json_response,
    plan_generation,
)
from exo_trio.api.messages import TextPart, text_of
from exo_trio.api.sampling import build_params
from exo_trio.api.sse import sse_event
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.node import Node
from exo_trio.types import (
    FinishReason,
    GenerationFailed,
    GenerationFinished,
    TextGeneration,
)


class AnthropicMessage(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[TextPart]


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[AnthropicMessage]
    system: str | list[TextPart] | None = None
    tools: list[dict[str, object]] | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, object] | None = None
    tool_choice: dict[str, object] | None = None
    # Extensions, not Anthropic's: the same meaning as in OpenAI chat completions
    # (ban tokens; run past EOS), so tests and benchmarks can fix the length.
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    seed: int | None = None


def prompt_tokens(node: Node, body: CountTokensRequest) -> list[int]:
    if not body.messages:
        raise ApiError(400, "messages: at least one message is required.", param="messages")
    if body.tools:
        raise ApiError(400, "Tool use is not supported by this server.", param="tools")
    messages = []
    system = text_of(body.system, "system")
    if system:
        messages.append({"role": "system", "content": system})
    messages += [
        {"role": m.role, "content": text_of(m.content, f"messages[{i}].content")}
        for i, m in enumerate(body.messages)
    ]
    return node.encoder.chat_tokens(messages)


def parse_messages_request(node: Node, raw: bytes) -> tuple[MessagesRequest, TextGeneration]:
    body = decode_body(raw, MessagesRequest)
    model = find_model(node, body.model)
    tokens = prompt_tokens(node, body)
    params = build_params(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_sequences,
        logit_bias=body.logit_bias,
        ignore_eos=body.ignore_eos,
        # Anthropic's temperature range is [0, 1]; it has no limit on stop sequences.
        max_temperature=1.0,
        max_stops=None,
        names={"stop": "stop_sequences"},
    )
    return body, plan_generation(
        node, model, tokens, params, node.seams.new_id("msg"), client_id=client_request_id()
    )


def stop_reason(finish_reason: FinishReason, stop_sequence: str | None) -> str:
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def message(
    command: TextGeneration,
    text: str | None,
    usage: dict[str, int],
    reason: str | None = None,
    stop_sequence: str | None = None,
) -> dict[str, object]:
    return {
        "id": command.request_id,
        "type": "message",
        "role": "assistant",
        "model": command.model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


class AnthropicEvents(StreamEncoder):
    """message_start, one text block, message_delta, message_stop; ping as keep-alive."""

    def __init__(self, command: TextGeneration) -> None:
        self.command = command

    def start(self) -> list[bytes]:
        usage = {"input_tokens": len(self.command.prompt_tokens), "output_tokens": 0}
        return [
            sse_event(
                "message_start",
                {"type": "message_start", "message": message(self.command, None, usage)},
            ),
            sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            # Anthropic sends a ping here too; clients must (and do) skip pings.
            sse_event("ping", {"type": "ping"}),
        ]

    def keepalive(self) -> list[bytes]:
        return [sse_event("ping", {"type": "ping"})]

    def text(self, text: str) -> list[bytes]:
        delta = {"type": "text_delta", "text": text}
        return [
            sse_event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        ]

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        delta = {
            "stop_reason": stop_reason(event.finish_reason, event.stop_sequence),
            "stop_sequence": event.stop_sequence,
        }
        return [
            sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": {
                        "input_tokens": event.prompt_tokens,
                        "output_tokens": event.completion_tokens,
                    },
                },
            ),
            sse_event("message_stop", {"type": "message_stop"}),
        ]

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        # The anthropic client raises on an `error` event mid-stream.
        return [sse_event("error", anthropic_error_body(failure_error(event)))]


async def messages(ctx: ApiContext) -> Response:
    body, command = parse_messages_request(ctx.node, await ctx.body())
    ctx.begin(command)
    if body.stream:
        return ctx.stream(command, AnthropicEvents(command))
    result = await ctx.complete(command)
    usage = {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens}
    reason = stop_reason(result.finish_reason, result.stop_sequence)
    payload = message(command, result.text, usage, reason, result.stop_sequence)
    return json_response(payload, command)


async def count_tokens(ctx: ApiContext) -> dict[str, object]:
    body = decode_body(await ctx.body(), CountTokensRequest)
    find_model(ctx.node, body.model)
    return {"input_tokens": len(prompt_tokens(ctx.node, body))}
