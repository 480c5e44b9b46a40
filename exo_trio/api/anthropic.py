"""Anthropic messages: POST /v1/messages (streaming and not) and
POST /v1/messages/count_tokens.

The system prompt becomes a leading system message and goes through the model's
chat template like every other dialect's, so the same conversation gives the same
prompt tokens here as through chat completions. Tools (custom tools) go through
the template too: an assistant's `tool_use` blocks become its tool calls, a
user's `tool_result` blocks become tool messages; the model's calls come back as
`tool_use` blocks (streamed as `input_json_delta`), with `stop_reason:
"tool_use"`. `thinking` switches the template's thinking on (with a budget the
runner enforces) and returns `thinking` blocks; without it thinking is off, as
Anthropic's default is. Images, documents and server tools are refused (400).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from quart import Response

from exo_trio.api.chat_plan import ChatPlan, ChatSetup, check_tools, plan_chat
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, anthropic_error_body, decode_body
from exo_trio.api.fields import ANTHROPIC, refuse_present
from exo_trio.api.generation import (
    Timing,
    client_request_id,
    failure_error,
    find_model,
    json_response,
)
from exo_trio.api.sampling import build_params
from exo_trio.api.sse import sse_event
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.api.structured import ToolChoice
from exo_trio.chat_output import OutputSplitter, Part, ToolCall
from exo_trio.node import Node
from exo_trio.types import (
    FinishReason,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)


class Block(msgspec.Struct, kw_only=True):
    """A content block of any type; the fields each type uses."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    cache_control: dict[str, Any] | None = None
    citations: list[dict[str, Any]] | None = None


class AnthropicMessage(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ThinkingConfig(msgspec.Struct, kw_only=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: str | None = None


class OutputFormat(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, kw_only=True):
    format: OutputFormat | None = None
    effort: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    messages: list[AnthropicMessage]
    system: str | list[Block] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None
    mcp_servers: Any = None
    context_management: Any = None
    container: Any = None
    diagnostics: Any = None


class MessagesRequest(CountTokensRequest, kw_only=True, forbid_unknown_fields=True):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # Extensions, not Anthropic's: the same meaning as in OpenAI chat completions
    # (ban tokens; run past EOS), so tests and benchmarks can fix the length.
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    seed: int | None = None


def _text(blocks: str | list[Block] | None, where: str) -> str:
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks):
        if block.type != "text" or block.text is None:
            raise ApiError(
                400,
                f"Content type `{block.type}` is not supported here; only `text` is.",
                param=f"{where}[{j}]",
            )
        texts.append(block.text)
    return "".join(texts)


def _conversation(body: CountTokensRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = _text(body.system, "system")
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        for j, block in enumerate(m.content):
            at = f"{where}[{j}]"
            if block.type == "text" and block.text is not None:
                texts.append(block.text)
            elif block.type == "tool_result" and m.role == "user":
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.tool_use_id,
                        "content": _text(block.content, f"{at}.content"),
                    }
                )
            elif block.type == "tool_use" and m.role == "assistant" and block.name:
                arguments = block.input if block.input is not None else {}
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": arguments},
                    }
                )
            elif block.type in ("thinking", "redacted_thinking") and m.role == "assistant":
                thinking.append(block.thinking or "")
            else:
                raise ApiError(
                    400,
                    f"Content type `{block.type}` is not supported in a {m.role} message.",
                    param=at,
                )
        if texts or calls or m.role == "assistant":
            message: dict[str, Any] = {"role": m.role, "content": "".join(texts)}
            if calls:
                message["tool_calls"] = calls
            if any(thinking):
                message["reasoning_content"] = "".join(thinking)
            messages.append(message)
    return messages


def _tools(body: CountTokensRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    tools = []
    for i, tool in enumerate(body.tools):
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            raise ApiError(
                400, "Only custom tools (with an input_schema) are supported.", param=f"tools[{i}]"
            )
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return check_tools(tools)


def _tool_choice(raw: dict[str, Any] | None) -> ToolChoice:
    if raw is None:
        return ToolChoice()
    parallel = not raw.get("disable_parallel_tool_use", False)
    kind = raw.get("type")
    if kind in ("auto", "none"):
        return ToolChoice(kind, parallel=parallel)
    if kind == "any":
        return ToolChoice("required", parallel=parallel)
    if kind == "tool" and isinstance(raw.get("name"), str):
        return ToolChoice("named", raw["name"], parallel)
    raise ApiError(
        400, "tool_choice must be auto, any, tool (with a name) or none.", param="tool_choice"
    )


def chat_plan(body: CountTokensRequest) -> ChatPlan:
    refuse_present(body, ANTHROPIC)
    if not body.messages:
        raise ApiError(400, "messages: at least one message is required.", param="messages")
    plan = ChatPlan(
        messages=_conversation(body), tools=_tools(body), tool_choice=_tool_choice(body.tool_choice)
    )
    thinking = body.thinking
    plan.thinking = thinking is not None and thinking.type != "disabled"
    if thinking is not None and thinking.type == "enabled":
        if thinking.budget_tokens is None or thinking.budget_tokens < 1:
            raise ApiError(
                400, "thinking.budget_tokens must be at least 1.", param="thinking.budget_tokens"
            )
        plan.thinking_budget = thinking.budget_tokens
    config = body.output_config
    if config is not None:
        if config.effort is not None:
            raise ApiError(
                400,
                "`output_config.effort` is not supported by this server.",
                param="output_config.effort",
            )
        if config.format is not None:
            plan.schema = config.format.schema
            plan.schema_param = "output_config.format.schema"
    return plan


def parse_messages_request(
    node: Node, raw: bytes
) -> tuple[MessagesRequest, TextGeneration, ChatSetup]:
    body = decode_body(raw, MessagesRequest)
    model = find_model(node, body.model)
    plan = chat_plan(body)
    if plan.thinking_budget is not None and plan.thinking_budget >= body.max_tokens:
        raise ApiError(
            400,
            "thinking.budget_tokens must be less than max_tokens.",
            param="thinking.budget_tokens",
        )

    def params(prompt: list[int]) -> SamplingParams:
        return build_params(
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

    command, setup = plan_chat(
        node, model, plan, params, node.seams.new_id("msg"), client_request_id()
    )
    return body, command, setup


def stop_reason(finish_reason: FinishReason, stop_sequence: str | None, calls: int = 0) -> str:
    if finish_reason == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def tool_use(call: ToolCall) -> dict[str, object]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def message(
    command: TextGeneration,
    content: list[dict[str, object]],
    usage: dict[str, int],
    reason: str | None = None,
    stop_sequence: str | None = None,
) -> dict[str, object]:
    return {
        "id": command.request_id,
        "type": "message",
        "role": "assistant",
        "model": command.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def final_usage(prompt: int, completion: int, cached: int) -> dict[str, int]:
    """Anthropic counts prompt tokens read from a cache apart: the prompt is
    input_tokens + cache_read_input_tokens (+ cache_creation_input_tokens, 0 here:
    keeping a request's KV costs nothing extra)."""
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": completion,
    }


class AnthropicEvents(StreamEncoder):
    """message_start, a content block per run of text, thinking or call,
    message_delta, message_stop; ping as keep-alive."""

    def __init__(self, command: TextGeneration, setup: ChatSetup) -> None:
        self.command = command
        self.splitter: OutputSplitter = setup.splitter()
        self.index = -1  # the open block's index
        self.open: str | None = None  # its kind: "text" or "thinking"

    def start(self) -> list[bytes]:
        usage = {"input_tokens": len(self.command.prompt_tokens), "output_tokens": 0}
        return [
            sse_event(
                "message_start",
                {"type": "message_start", "message": message(self.command, [], usage)},
            ),
            # Anthropic sends a ping here too; clients must (and do) skip pings.
            sse_event("ping", {"type": "ping"}),
        ]

    def keepalive(self) -> list[bytes]:
        return [sse_event("ping", {"type": "ping"})]

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [
            sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})
        ]

    def _start_block(self, block: dict[str, object]) -> list[bytes]:
        out = self._close()
        self.index += 1
        out.append(
            sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": block},
            )
        )
        return out

    def _delta(self, delta: dict[str, object]) -> bytes:
        return sse_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self.index, "delta": delta},
        )

    def parts(self, parts: list[Part]) -> list[bytes]:
        out: list[bytes] = []
        for part in parts:
            if part.call is not None:
                block = {**tool_use(part.call), "input": {}}
                out += self._start_block(block)
                out.append(
                    self._delta(
                        {"type": "input_json_delta", "partial_json": part.call.arguments_json}
                    )
                )
                out += self._close()
                continue
            if self.open != part.channel:
                if part.channel == "thinking":
                    out += self._start_block({"type": "thinking", "thinking": "", "signature": ""})
                else:
                    out += self._start_block({"type": "text", "text": ""})
                self.open = part.channel
            if part.channel == "thinking":
                out.append(self._delta({"type": "thinking_delta", "thinking": part.text}))
            else:
                out.append(self._delta({"type": "text_delta", "text": part.text}))
        return out

    def text(self, text: str) -> list[bytes]:
        return self.parts(self.splitter.push(text))

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        out = self.parts(self.splitter.finish())
        if self.index < 0:  # nothing at all: one empty text block, as Anthropic sends
            out += self._start_block({"type": "text", "text": ""})
            self.open = "text"
        out += self._close()
        delta = {
            "stop_reason": stop_reason(
                event.finish_reason, event.stop_sequence, self.splitter.calls
            ),
            "stop_sequence": event.stop_sequence,
        }
        return [
            *out,
            sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": final_usage(
                        event.prompt_tokens, event.completion_tokens, event.cached_tokens
                    ),
                },
            ),
            sse_event("message_stop", {"type": "message_stop"}),
        ]

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        # Everything generated reaches the client first (text held back; a call
        # that never closed comes back as text). The anthropic client raises on
        # an `error` event mid-stream.
        out = self.parts(self.splitter.finish())
        return [*out, sse_event("error", anthropic_error_body(failure_error(event)))]


def content_blocks(setup: ChatSetup, text: str) -> tuple[list[dict[str, object]], int]:
    """A whole response's content blocks, and how many calls it made."""
    splitter = setup.splitter()
    blocks: list[dict[str, object]] = []
    calls = 0
    for part in splitter.push(text) + splitter.finish():
        if part.call is not None:
            blocks.append(tool_use(part.call))
            calls += 1
        elif part.channel == "thinking":
            blocks.append({"type": "thinking", "thinking": part.text, "signature": ""})
        else:
            blocks.append({"type": "text", "text": part.text})
    return blocks or [{"type": "text", "text": ""}], calls


async def messages(ctx: ApiContext) -> Response:
    body, command, setup = parse_messages_request(ctx.node, await ctx.body())
    ctx.begin(command)
    if body.stream:
        return ctx.stream(command, AnthropicEvents(command, setup))
    result = await ctx.complete(command)
    usage = final_usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
    blocks, calls = content_blocks(setup, result.text)
    reason = stop_reason(result.finish_reason, result.stop_sequence, calls)
    payload = message(command, blocks, usage, reason, result.stop_sequence)
    return json_response(payload, command)


async def count_tokens(ctx: ApiContext) -> dict[str, object]:
    body = decode_body(await ctx.body(), CountTokensRequest)
    model = find_model(ctx.node, body.model)
    plan = chat_plan(body)
    shown = plan.tools if plan.tool_choice.mode != "none" else None
    encoder = ctx.node.encoder_for(model.id)
    return {"input_tokens": len(encoder.chat_tokens(plan.messages, shown, plan.thinking))}
