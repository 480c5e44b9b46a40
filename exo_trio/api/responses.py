"""OpenAI Responses: POST /v1/responses, streaming and not.

Stateless: `previous_response_id` and stored conversations are refused (400)
rather than ignored; send the whole conversation in `input`. `instructions`
becomes a leading system message, so the same conversation gives the same
prompt as chat completions. Function tools go through the chat template
(`function_call` and `function_call_output` input items included); the model's
calls come back as `function_call` output items, its thinking as a `reasoning`
item with `reasoning_text` content. `text.format` (json_object, json_schema) and
forced calls are grammars (api/structured.py).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from quart import Response

from exo_trio.api.chat_plan import ChatPlan, ChatSetup, check_tools, parse_arguments, plan_chat
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.fields import RESPONSES, refuse_present
from exo_trio.api.generation import (
    Timing,
    client_request_id,
    default_max_tokens,
    failure_error,
    find_model,
    json_response,
)
from exo_trio.api.messages import TextPart, text_of
from exo_trio.api.openai_common import logprob_entry
from exo_trio.api.sampling import build_params
from exo_trio.api.sse import KEEPALIVE, sse_event
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.api.structured import ToolChoice
from exo_trio.chat_output import OutputSplitter, Part, ToolCall
from exo_trio.node import Node
from exo_trio.types import (
    ChunkGenerated,
    FinishReason,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)

TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class InputItem(msgspec.Struct, kw_only=True):
    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[TextPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[TextPart] | None = None
    summary: list[TextPart] | None = None
    encrypted_content: str | None = None


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(msgspec.Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    truncation: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    background_options: Any = None
    context_management: Any = None
    max_tool_calls: int | None = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    # Extensions, not OpenAI's (the same meaning as in chat completions).
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    top_k: int | None = None


def conversation(body: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    reasoning: list[str] = []
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if item.type == "message" and item.role is not None:
            message: dict[str, Any] = {
                "role": item.role,
                "content": text_of(item.content, f"{where}.content", TEXT_PARTS),
            }
            if item.role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = "".join(reasoning), []
            messages.append(message)
        elif item.type == "function_call" and item.name:
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {
                    "name": item.name,
                    "arguments": parse_arguments(item.arguments or "{}", f"{where}.arguments"),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning:
                    message["reasoning_content"], reasoning = "".join(reasoning), []
                messages.append(message)
        elif item.type == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.call_id,
                    "content": text_of(item.output, f"{where}.output", TEXT_PARTS),
                }
            )
        elif item.type == "reasoning":
            parts = item.content or item.summary or []
            reasoning.append(text_of(parts, f"{where}.content", TEXT_PARTS))
        else:
            raise ApiError(
                400,
                f"Input item type `{item.type}` is not supported; messages, function_call, "
                "function_call_output and reasoning items are.",
                param=where,
            )
    return messages


def _tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    tools = []
    for i, tool in enumerate(body.tools):
        if tool.get("type") != "function":
            raise ApiError(400, "Only function tools are supported.", param=f"tools[{i}]")
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        tools.append({"type": "function", "function": function})
    return check_tools(tools)


def _tool_choice(body: ResponsesRequest) -> ToolChoice:
    parallel = body.parallel_tool_calls is not False
    raw = body.tool_choice
    if raw is None:
        return ToolChoice(parallel=parallel)
    if isinstance(raw, str) and raw in ("auto", "none", "required"):
        return ToolChoice(raw, parallel=parallel)
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        return ToolChoice("named", raw["name"], parallel)
    raise ApiError(
        400, "tool_choice must be auto, none, required or a function.", param="tool_choice"
    )


def parse_responses_request(
    node: Node, raw: bytes
) -> tuple[ResponsesRequest, TextGeneration, ChatSetup]:
    body = decode_body(raw, ResponsesRequest)
    refuse_present(body, RESPONSES)
    if not body.input:
        raise ApiError(400, "input must not be empty.", param="input")
    if body.truncation not in (None, "disabled"):
        raise ApiError(
            400,
            "Only truncation `disabled` is supported: a prompt that does not fit is refused.",
            param="truncation",
        )
    include = body.include or []
    for i, name in enumerate(include):
        if name != LOGPROBS_INCLUDE:
            raise ApiError(400, f"include `{name}` is not supported.", param=f"include[{i}]")
    model = find_model(node, body.model)
    effort = body.reasoning.effort if body.reasoning else None
    plan = ChatPlan(
        messages=conversation(body),
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        thinking=None if effort is None else effort != "none",
        schema_param="text.format.schema",
    )
    if body.text is not None:
        if body.text.verbosity is not None:
            raise ApiError(
                400, "`text.verbosity` is not supported by this server.", param="text.verbosity"
            )
        fmt = body.text.format
        if fmt is not None and fmt.type == "json_object":
            plan.json_mode = True
        elif fmt is not None and fmt.type == "json_schema":
            plan.schema = fmt.schema or {}
    logprobs = None
    if body.top_logprobs is not None or LOGPROBS_INCLUDE in include:
        logprobs = body.top_logprobs or 0

    def params(prompt: list[int]) -> SamplingParams:
        max_tokens = body.max_output_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens(model, prompt)
        return build_params(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            logit_bias=body.logit_bias,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            names={"max_tokens": "max_output_tokens", "logprobs": "top_logprobs"},
        )

    request_id = node.seams.new_id("resp")
    command, setup = plan_chat(
        node, model, plan, params, request_id, client_request_id(), prompt_param="input"
    )
    return body, command, setup


class ResponseShape:
    """Builds the `response` object and its output items for one request."""

    def __init__(
        self, node: Node, command: TextGeneration, body: ResponsesRequest, setup: ChatSetup
    ) -> None:
        self.node = node
        self.command = command
        self.body = body
        self.setup = setup
        self.created_at = int(node.seams.wall_clock())

    def new_item_id(self, prefix: str) -> str:
        return self.node.seams.new_id(prefix)

    @staticmethod
    def text_part(text: str, logprobs: list[dict[str, object]] | None = None) -> dict[str, object]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def message_item(
        self, item_id: str, text: str | None, status: str, logprobs: list[dict[str, object]]
    ) -> dict[str, object]:
        return {
            "type": "message",
            "id": item_id,
            "status": status,
            "role": "assistant",
            "content": [] if text is None else [self.text_part(text, logprobs)],
        }

    @staticmethod
    def reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, object]:
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {
            "type": "reasoning",
            "id": item_id,
            "status": status,
            "summary": [],
            "content": content,
        }

    @staticmethod
    def call_item(item_id: str, call: ToolCall, arguments: str, status: str) -> dict[str, object]:
        return {
            "type": "function_call",
            "id": item_id,
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
            "status": status,
        }

    def response(
        self,
        status: str,
        output: list[dict[str, object]],
        finish: tuple[FinishReason, int, int, int] | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, object]:
        """`finish` is (finish reason, prompt, completion and cached prompt tokens)."""
        usage = incomplete = None
        if finish is not None:
            reason, prompt, completion, cached = finish
            if reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        body = self.body
        fmt = body.text.format if body.text and body.text.format else None
        text_format: dict[str, object] = {"type": "text"}
        if fmt is not None:
            text_format = msgspec.to_builtins(fmt)
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
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "temperature": self.command.params.temperature,
            "top_p": self.command.params.top_p,
            "text": {"format": text_format},
            "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
            "tools": body.tools or [],
            "truncation": "disabled",
            "store": False,
            "metadata": body.metadata or {},
            "usage": usage,
        }

    def output(self, text: str, chunks: list[ChunkGenerated]) -> list[dict[str, object]]:
        """A whole response's output items: reasoning, message, calls."""
        answer, thinking, calls = self.setup.split(text)
        items: list[dict[str, object]] = []
        if thinking:
            items.append(self.reasoning_item(self.new_item_id("rs"), thinking, "completed"))
        logprobs = [logprob_entry(c) for c in chunks if c.logprob is not None]
        if answer or not calls:
            items.append(self.message_item(self.new_item_id("msg"), answer, "completed", logprobs))
        for call in calls:
            items.append(
                self.call_item(self.new_item_id("fc"), call, call.arguments_json, "completed")
            )
        return items


class ResponseEvents(StreamEncoder):
    """The response.* event family, each event numbered by `sequence_number`: an
    output item per run of thinking or text, and per call."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.sequence = 0
        self.splitter: OutputSplitter = shape.setup.splitter()
        self.items: list[dict[str, object]] = []  # finished output items
        self.open: tuple[str, str] | None = None  # (kind, item id) of the open item
        self.open_text: list[str] = []
        self.pending: list[dict[str, object]] = []  # logprobs not yet sent
        self.open_logprobs: list[dict[str, object]] = []

    def event(self, kind: str, **fields: object) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(kind, payload)

    def start(self) -> list[bytes]:
        in_progress = self.shape.response("in_progress", [])
        return [
            self.event("response.created", response=in_progress),
            self.event("response.in_progress", response=in_progress),
        ]

    def keepalive(self) -> list[bytes]:
        return [KEEPALIVE]

    @property
    def output_index(self) -> int:
        return len(self.items)

    def _located(self, item_id: str, **fields: object) -> dict[str, object]:
        return {"item_id": item_id, "output_index": self.output_index, "content_index": 0, **fields}

    def _open(self, kind: str) -> list[bytes]:
        out = self._close()
        prefix = "rs" if kind == "thinking" else "msg"
        item_id = self.shape.new_item_id(prefix)
        self.open = (kind, item_id)
        self.open_text = []
        self.open_logprobs = []
        if kind == "thinking":
            item = self.shape.reasoning_item(item_id, None, "in_progress")
            part: dict[str, object] = {"type": "reasoning_text", "text": ""}
        else:
            item = self.shape.message_item(item_id, None, "in_progress", [])
            part = self.shape.text_part("")
        out.append(
            self.event("response.output_item.added", output_index=self.output_index, item=item)
        )
        out.append(self.event("response.content_part.added", **self._located(item_id, part=part)))
        return out

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        kind, item_id = self.open
        self.open = None
        text = "".join(self.open_text)
        if kind == "thinking":
            item = self.shape.reasoning_item(item_id, text, "completed")
            part: dict[str, object] = {"type": "reasoning_text", "text": text}
            out = [self.event("response.reasoning_text.done", **self._located(item_id, text=text))]
        else:
            item = self.shape.message_item(item_id, text, "completed", self.open_logprobs)
            part = self.shape.text_part(text, self.open_logprobs)
            out = [
                self.event(
                    "response.output_text.done",
                    **self._located(item_id, text=text, logprobs=self.open_logprobs),
                )
            ]
        out.append(self.event("response.content_part.done", **self._located(item_id, part=part)))
        out.append(
            self.event("response.output_item.done", output_index=self.output_index, item=item)
        )
        self.items.append(item)
        return out

    def parts(self, parts: list[Part]) -> list[bytes]:
        out: list[bytes] = []
        for part in parts:
            if part.call is not None:
                out += self._close()
                item_id = self.shape.new_item_id("fc")
                arguments = part.call.arguments_json
                added = self.shape.call_item(item_id, part.call, "", "in_progress")
                done = self.shape.call_item(item_id, part.call, arguments, "completed")
                index = self.output_index
                out += [
                    self.event("response.output_item.added", output_index=index, item=added),
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=item_id,
                        output_index=index,
                        delta=arguments,
                    ),
                    self.event(
                        "response.function_call_arguments.done",
                        item_id=item_id,
                        output_index=index,
                        arguments=arguments,
                        name=part.call.name,
                    ),
                    self.event("response.output_item.done", output_index=index, item=done),
                ]
                self.items.append(done)
                continue
            if self.open is None or self.open[0] != part.channel:
                out += self._open(part.channel)
            assert self.open is not None
            item_id = self.open[1]
            self.open_text.append(part.text)
            if part.channel == "thinking":
                out.append(
                    self.event(
                        "response.reasoning_text.delta", **self._located(item_id, delta=part.text)
                    )
                )
            else:
                logprobs, self.pending = self.pending, []
                self.open_logprobs += logprobs
                out.append(
                    self.event(
                        "response.output_text.delta",
                        **self._located(item_id, delta=part.text, logprobs=logprobs),
                    )
                )
        return out

    def token(self, event: ChunkGenerated) -> list[bytes]:
        if event.logprob is not None:
            self.pending.append(logprob_entry(event))
        return self.text(event.text) if event.text else []

    def text(self, text: str) -> list[bytes]:
        return self.parts(self.splitter.push(text))

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        out = self.parts(self.splitter.finish())
        if not self.items and self.open is None:  # nothing at all: one empty message
            out += self._open("text")
        if self.pending and self.open is not None and self.open[0] == "text":
            self.open_logprobs += self.pending
            self.pending = []
        out += self._close()
        final = self.shape.response(
            "completed",
            self.items,
            (
                event.finish_reason,
                event.prompt_tokens,
                event.completion_tokens,
                event.cached_tokens,
            ),
        )
        return [*out, self.event(f"response.{final['status']}", response=final)]

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        error = failure_error(event)
        # Everything generated first (a call that never closed comes back as text).
        out = self.parts(self.splitter.finish()) + self._close()
        failed = self.shape.response(
            "failed", self.items, error={"code": error.code or error.type, "message": error.message}
        )
        return [*out, self.event("response.failed", response=failed)]


async def responses(ctx: ApiContext) -> Response:
    body, command, setup = parse_responses_request(ctx.node, await ctx.body())
    ctx.begin(command)
    shape = ResponseShape(ctx.node, command, body, setup)
    if body.stream:
        return ctx.stream(command, ResponseEvents(shape))
    result = await ctx.complete(command)
    finish = (
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
        result.cached_tokens,
    )
    output = shape.output(result.text, result.chunks)
    return json_response(shape.response("completed", output, finish), command)
