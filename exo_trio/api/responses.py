"""OpenAI Responses: POST /v1/responses, streaming and not.

Stateless: `previous_response_id`, tools and non-text output formats are refused
(400) rather than ignored. `instructions` becomes a leading system message, so
the same conversation gives the same prompt as chat completions.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from quart import Response

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.generation import (
    Timing,
    client_request_id,
    default_max_tokens,
    failure_error,
    find_model,
    json_response,
    plan_generation,
)
from exo_trio.api.messages import TextPart, text_of
from exo_trio.api.sampling import build_params
from exo_trio.api.sse import KEEPALIVE, sse_event
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.node import Node
from exo_trio.types import FinishReason, GenerationFailed, GenerationFinished, TextGeneration

TEXT_PARTS = ("input_text", "output_text", "text")


class InputItem(msgspec.Struct, kw_only=True):
    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[TextPart] | None = None


class TextFormat(msgspec.Struct, kw_only=True):
    type: str = "text"


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    previous_response_id: str | None = None
    tools: list[dict[str, object]] | None = None
    text: TextConfig | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Extensions, not OpenAI's (the same meaning as in chat completions).
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    top_k: int | None = None


def conversation(body: ResponsesRequest) -> list[dict[str, str]]:
    messages = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        if item.type != "message" or item.role is None:
            raise ApiError(
                400,
                f"Input item type `{item.type}` is not supported; only messages are.",
                param=f"input[{i}]",
            )
        content = text_of(item.content, f"input[{i}].content", TEXT_PARTS)
        messages.append({"role": item.role, "content": content})
    return messages


def parse_responses_request(node: Node, raw: bytes) -> tuple[ResponsesRequest, TextGeneration]:
    body = decode_body(raw, ResponsesRequest)
    if body.previous_response_id:
        raise ApiError(
            400,
            "Stored responses are not kept; send the whole conversation in `input`.",
            param="previous_response_id",
        )
    if body.tools:
        raise ApiError(400, "Tools are not supported by this server.", param="tools")
    if body.text and body.text.format and body.text.format.type != "text":
        raise ApiError(400, "Only plain text output is supported.", param="text.format")
    if not body.input:
        raise ApiError(400, "input must not be empty.", param="input")
    model = find_model(node, body.model)
    prompt = node.encoder.chat_tokens(conversation(body))
    max_tokens = body.max_output_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(model, prompt)
    params = build_params(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        logit_bias=body.logit_bias,
        ignore_eos=body.ignore_eos,
        names={"max_tokens": "max_output_tokens"},
    )
    request_id = node.seams.new_id("resp")
    return body, plan_generation(
        node, model, prompt, params, request_id, "input", client_request_id()
    )


class ResponseShape:
    """Builds the `response` object and its output item for one request."""

    def __init__(self, node: Node, command: TextGeneration, body: ResponsesRequest) -> None:
        self.command = command
        self.body = body
        self.created_at = int(node.seams.wall_clock())
        self.item_id = node.seams.new_id("msg")

    def part(self, text: str) -> dict[str, object]:
        return {"type": "output_text", "text": text, "annotations": []}

    def item(self, text: str | None, status: str) -> dict[str, object]:
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": [] if text is None else [self.part(text)],
        }

    def response(
        self,
        status: str,
        text: str | None = None,
        finish: tuple[FinishReason, int, int] | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, object]:
        """`finish` is (finish reason, prompt tokens, completion tokens)."""
        usage = incomplete = None
        if finish is not None:
            reason, prompt, completion = finish
            if reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        body = self.body
        return {
            "id": self.command.request_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.command.model,
            "output": [] if text is None else [self.item(text, status)],
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "temperature": self.command.params.temperature,
            "top_p": self.command.params.top_p,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "store": False,
            "metadata": body.metadata or {},
            "usage": usage,
        }


class ResponseEvents(StreamEncoder):
    """The response.* event family, each event numbered by `sequence_number`."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.sequence = 0
        self.parts: list[str] = []

    def event(self, kind: str, **fields: object) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(kind, payload)

    def located(self, **fields: object) -> dict[str, object]:
        return {"item_id": self.shape.item_id, "output_index": 0, "content_index": 0, **fields}

    def start(self) -> list[bytes]:
        in_progress = self.shape.response("in_progress")
        return [
            self.event("response.created", response=in_progress),
            self.event("response.in_progress", response=in_progress),
            self.event(
                "response.output_item.added",
                output_index=0,
                item=self.shape.item(None, "in_progress"),
            ),
            self.event("response.content_part.added", **self.located(part=self.shape.part(""))),
        ]

    def keepalive(self) -> list[bytes]:
        return [KEEPALIVE]

    def text(self, text: str) -> list[bytes]:
        self.parts.append(text)
        return [self.event("response.output_text.delta", **self.located(delta=text, logprobs=[]))]

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        text = "".join(self.parts)
        final = self.shape.response(
            "completed",
            text,
            (event.finish_reason, event.prompt_tokens, event.completion_tokens),
        )
        item = final["output"][0]  # type: ignore[index]
        return [
            self.event("response.output_text.done", **self.located(text=text, logprobs=[])),
            self.event("response.content_part.done", **self.located(part=self.shape.part(text))),
            self.event("response.output_item.done", output_index=0, item=item),
            self.event(f"response.{final['status']}", response=final),
        ]

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        error = failure_error(event)
        failed = self.shape.response(
            "failed",
            "".join(self.parts),
            error={"code": error.code or error.type, "message": error.message},
        )
        return [self.event("response.failed", response=failed)]


async def responses(ctx: ApiContext) -> Response:
    body, command = parse_responses_request(ctx.node, await ctx.body())
    ctx.begin(command)
    shape = ResponseShape(ctx.node, command, body)
    if body.stream:
        return ctx.stream(command, ResponseEvents(shape))
    result = await ctx.complete(command)
    finish = (result.finish_reason, result.prompt_tokens, result.completion_tokens)
    return json_response(shape.response("completed", result.text, finish), command)
