"""OpenAI chat completions: POST /v1/chat/completions, streaming and not."""

from __future__ import annotations

from typing import Literal

import msgspec
from quart import Response

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.generation import (
    Completion,
    client_request_id,
    default_max_tokens,
    find_model,
    json_response,
    plan_generation,
)
from exo_trio.api.messages import TextPart, text_of
from exo_trio.api.openai_common import OpenAIChunks, OpenAISampling, openai_params, usage
from exo_trio.node import Node
from exo_trio.types import TextGeneration


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAISampling, kw_only=True):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def parse_chat_request(node: Node, raw: bytes) -> tuple[ChatCompletionRequest, TextGeneration]:
    body = decode_body(raw, ChatCompletionRequest)
    if not body.messages:
        raise ApiError(400, "messages must contain at least one message.", param="messages")
    model = find_model(node, body.model)
    messages = [
        {"role": m.role, "content": text_of(m.content, f"messages[{i}].content")}
        for i, m in enumerate(body.messages)
    ]
    prompt = node.encoder.chat_tokens(messages)
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(model, prompt)
    params = openai_params(body, max_tokens)
    request_id = node.seams.new_id("chatcmpl")
    return body, plan_generation(
        node, model, prompt, params, request_id, client_id=client_request_id()
    )


class ChatChunks(OpenAIChunks):
    object = "chat.completion.chunk"

    def start(self) -> list[bytes]:
        return [self.chunk([self.choice(None, None, {"role": "assistant", "content": ""})])]

    def choice(
        self, text: str | None, finish_reason: str | None, delta: dict[str, object] | None = None
    ) -> dict[str, object]:
        if delta is None:
            delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chat_completion(command: TextGeneration, created: int, result: Completion) -> dict[str, object]:
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


async def chat_completions(ctx: ApiContext) -> Response:
    body, command = parse_chat_request(ctx.node, await ctx.body())
    ctx.begin(command)
    created = int(ctx.node.seams.wall_clock())
    if body.stream:
        return ctx.stream(command, ChatChunks(command, created, body.include_usage))
    result = await ctx.complete(command)
    return json_response(chat_completion(command, created, result), command)
