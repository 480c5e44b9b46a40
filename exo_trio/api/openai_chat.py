"""OpenAI chat completions: POST /v1/chat/completions, streaming and not.

Tools go through the model's chat template (`tools`, an assistant's
`tool_calls`, `tool` messages); calls in the output are parsed with the model's
own format (exo_trio/chat_output.py) and returned as `tool_calls`, streamed as
`tool_calls` deltas with their `index`, with `finish_reason: "tool_calls"`.
Thinking is returned as `reasoning_content` (as vLLM and DeepSeek do).
`response_format` and forced tool calls are grammars (api/structured.py).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from quart import Response

from exo_trio.api.chat_plan import ChatPlan, ChatSetup, check_tools, parse_arguments, plan_chat
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.fields import OPENAI_CHAT, refuse_present
from exo_trio.api.generation import (
    Completion,
    Timing,
    client_request_id,
    default_max_tokens,
    find_model,
    json_response,
)
from exo_trio.api.messages import TextPart, text_of
from exo_trio.api.openai_common import (
    OpenAIChunks,
    OpenAISampling,
    logprob_entry,
    openai_params,
    usage,
)
from exo_trio.api.sse import DONE
from exo_trio.api.structured import ToolChoice
from exo_trio.chat_output import OutputSplitter, Part, ToolCall
from exo_trio.node import Node
from exo_trio.types import (
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)

CONTENT_PARTS = ("text", "refusal")


class FunctionCallIn(msgspec.Struct, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(msgspec.Struct, kw_only=True):
    function: FunctionCallIn
    id: str | None = None
    type: str = "function"


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallIn | None = None  # deprecated form of one tool call
    refusal: str | None = None
    reasoning_content: str | None = None  # an assistant's thinking (vLLM's name)
    audio: dict[str, Any] | None = None


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(OpenAISampling, kw_only=True, forbid_unknown_fields=True):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: Any = None


def _tool_choice(body: ChatCompletionRequest) -> ToolChoice:
    parallel = body.parallel_tool_calls is not False
    raw: Any = body.tool_choice
    param = "tool_choice"
    if raw is None and body.function_call is not None:
        raw, param = body.function_call, "function_call"
        if isinstance(raw, dict):  # {"name": ...}: the old way to name a function
            raw = {"type": "function", "function": raw}
    if raw is None:
        return ToolChoice("auto", parallel=parallel)
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise ApiError(
                400, "tool_choice must be auto, none, required or a function.", param=param
            )
        return ToolChoice(raw, parallel=parallel)
    function = raw.get("function") if raw.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(
            400,
            'tool_choice must name a function: {"type": "function", "function": {"name": ...}}.',
            param=param,
        )
    return ToolChoice("named", function["name"], parallel)


def _messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        refuse_present(m, {"audio": ("refused", "text only")}, f"{where}.")
        message: dict[str, Any] = {
            "role": "tool" if m.role == "function" else m.role,
            "content": text_of(m.content, f"{where}.content", CONTENT_PARTS),
        }
        calls = list(m.tool_calls or [])
        if m.function_call is not None:
            calls.append(ToolCallIn(function=m.function_call))
        if calls:
            if m.role != "assistant":
                raise ApiError(
                    400, "Only assistant messages carry tool calls.", param=f"{where}.tool_calls"
                )
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": parse_arguments(
                            c.function.arguments, f"{where}.tool_calls[{j}].function.arguments"
                        ),
                    },
                }
                for j, c in enumerate(calls)
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        if m.reasoning_content:
            message["reasoning_content"] = m.reasoning_content
        messages.append(message)
    return messages


def parse_chat_request(
    node: Node, raw: bytes
) -> tuple[ChatCompletionRequest, TextGeneration, ChatSetup]:
    body = decode_body(raw, ChatCompletionRequest)
    refuse_present(body, OPENAI_CHAT)
    if not body.messages:
        raise ApiError(400, "messages must contain at least one message.", param="messages")
    if body.modalities not in (None, ["text"]):
        raise ApiError(400, "Only the text modality is supported.", param="modalities")
    model = find_model(node, body.model)
    tools = list(body.tools or [])
    tools += [{"type": "function", "function": f} for f in body.functions or []]
    plan = ChatPlan(
        messages=_messages(body),
        tools=check_tools(tools) or None,
        tool_choice=_tool_choice(body),
        thinking=None if body.reasoning_effort is None else body.reasoning_effort != "none",
    )
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        plan.json_mode = True
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(
                400, "json_schema is required for this type.", param="response_format.json_schema"
            )
        plan.schema = fmt.json_schema.schema or {}
        plan.schema_param = "response_format.json_schema.schema"
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None

    def params(prompt: list[int]) -> SamplingParams:
        limit = default_max_tokens(model, prompt) if max_tokens is None else max_tokens
        return openai_params(body, limit, logprobs)

    request_id = node.seams.new_id("chatcmpl")
    command, setup = plan_chat(node, model, plan, params, request_id, client_request_id())
    return body, command, setup


def finish_reason(reason: str, calls: int) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, object]:
    out: dict[str, object] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
    return out if index is None else {"index": index, **out}


class ChatChunks(OpenAIChunks):
    object = "chat.completion.chunk"

    def __init__(
        self, command: TextGeneration, created: int, include_usage: bool, setup: ChatSetup
    ) -> None:
        super().__init__(command, created, include_usage)
        self.splitter: OutputSplitter = setup.splitter()
        self.pending: list[dict[str, object]] = []  # logprobs not yet sent
        self.calls_sent = 0

    def start(self) -> list[bytes]:
        return [self.chunk([self.choice(None, None, {"role": "assistant", "content": ""})])]

    def choice(
        self, text: str | None, finish_reason: str | None, delta: dict[str, object] | None = None
    ) -> dict[str, object]:
        if delta is None:
            delta = {} if text is None else {"content": text}
        logprobs = None
        if self.pending and ("content" in delta or finish_reason is not None):
            logprobs, self.pending = {"content": self.pending, "refusal": None}, []
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def token(self, event: ChunkGenerated) -> list[bytes]:
        if event.logprob is not None:
            self.pending.append(logprob_entry(event))
        return self.text(event.text) if event.text else []

    def parts(self, parts: list[Part]) -> list[bytes]:
        out = []
        for part in parts:
            delta: dict[str, object]
            if part.call is not None:
                delta = {"tool_calls": [tool_call_json(part.call, self.calls_sent)]}
                self.calls_sent += 1
            elif part.channel == "thinking":
                delta = {"reasoning_content": part.text}
            else:
                delta = {"content": part.text}
            out.append(self.chunk([self.choice(None, None, delta)]))
        return out

    def text(self, text: str) -> list[bytes]:
        return self.parts(self.splitter.push(text))

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        # Everything generated reaches the client before the error: text held
        # back (a call that never closed comes back as text).
        return self.parts(self.splitter.finish()) + super().fail(event, timing)

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        out = self.parts(self.splitter.finish())
        reason = finish_reason(event.finish_reason, self.splitter.calls)
        out.append(self.chunk([self.choice(None, reason)]))
        if self.include_usage:
            totals = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
            out.append(self.chunk([], totals))
        return [*out, DONE]


def chat_completion(
    command: TextGeneration, created: int, result: Completion, setup: ChatSetup
) -> dict[str, object]:
    text, thinking, calls = setup.split(result.text)
    message: dict[str, object] = {"role": "assistant", "content": text or None}
    if not calls and not text:
        message["content"] = ""
    if thinking:
        message["reasoning_content"] = thinking
    if calls:
        message["tool_calls"] = [tool_call_json(c) for c in calls]
    logprobs = None
    if command.params.logprobs is not None:
        entries = [logprob_entry(c) for c in result.chunks if c.logprob is not None]
        logprobs = {"content": entries, "refusal": None}
    return {
        "id": command.request_id,
        "object": "chat.completion",
        "created": created,
        "model": command.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason(result.finish_reason, len(calls)),
            }
        ],
        "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
    }


async def chat_completions(ctx: ApiContext) -> Response:
    body, command, setup = parse_chat_request(ctx.node, await ctx.body())
    ctx.begin(command)
    created = int(ctx.node.seams.wall_clock())
    if body.stream:
        return ctx.stream(command, ChatChunks(command, created, body.include_usage, setup))
    result = await ctx.complete(command)
    return json_response(chat_completion(command, created, result, setup), command)
