"""What every chat dialect shares between parsing its body and encoding its answer.

A dialect adapter turns its request into a `ChatPlan`: the conversation as the
chat template takes it (OpenAI-shaped messages: `tool_calls` on assistant
messages, `tool` messages with the results), the tools as OpenAI functions, the
tool choice, a response schema, the thinking switch. `plan_chat` renders the
prompt through the model's own template (tools included), builds the grammar a
forced call or a schema needs (api/structured.py), and tells the runner where
the model's thinking markers are when a grammar or a thinking budget must know.
The `ChatSetup` it returns is what the dialect's encoder needs to read the output
back: a fresh `OutputSplitter` per response.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from exo_trio.api.errors import ApiError
from exo_trio.api.generation import plan_generation
from exo_trio.api.structured import ToolChoice, structured_grammar
from exo_trio.chat_output import ChatFormat, OutputSplitter, ToolCall
from exo_trio.node import ModelCard, Node
from exo_trio.types import ChunkGenerated, SamplingParams, TextGeneration, ThinkingControl

__all__ = ["ChatPlan", "ChatSetup", "check_tools", "parse_arguments", "plan_chat"]


@dataclass
class ChatPlan:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    schema: dict[str, Any] | None = None  # the answer must be JSON of this schema
    json_mode: bool = False  # the answer must be a JSON object
    schema_param: str = "response_format"
    thinking: bool | None = None  # the template's switch; None: its default
    thinking_budget: int | None = None
    tools_param: str = "tools"


@dataclass
class ChatSetup:
    fmt: ChatFormat
    tools: list[dict[str, Any]] | None  # tools the output may call (None: no calls)
    thinks_first: bool  # the prompt left the model inside a thinking section
    new_id: Callable[[], str]
    forced: bool = False

    def splitter(self) -> OutputSplitter:
        return OutputSplitter(self.fmt, self.new_id, self.tools, self.thinks_first)

    def split(self, text: str) -> tuple[str, str, list[ToolCall]]:
        """A whole response: (text, thinking, calls)."""
        splitter = self.splitter()
        parts = splitter.push(text) + splitter.finish()
        answer = "".join(p.text for p in parts if p.channel == "text")
        thinking = "".join(p.text for p in parts if p.channel == "thinking")
        return answer, thinking, [p.call for p in parts if p.call is not None]


def check_tools(tools: list[dict[str, Any]], param: str = "tools") -> list[dict[str, Any]]:
    """OpenAI function tools, checked: a function with a name, parameters a schema."""
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ApiError(400, "Only function tools are supported.", param=f"{param}[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "A function needs a name.", param=f"{param}[{i}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ApiError(
                400,
                "parameters must be a JSON schema object.",
                param=f"{param}[{i}].function.parameters",
            )
        names.add(name)
    return tools


def parse_arguments(arguments: object, param: str) -> dict[str, Any]:
    """A call's arguments from history: a JSON object, or a string of one."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise ApiError(400, "arguments must be a JSON object.", param=param) from None
    if not isinstance(arguments, dict):
        raise ApiError(400, "arguments must be a JSON object.", param=param)
    return arguments


def plan_chat(
    node: Node,
    model: ModelCard,
    plan: ChatPlan,
    params_for: Callable[[list[int]], SamplingParams],
    request_id: str,
    client_id: str | None,
    prompt_param: str = "messages",
) -> tuple[TextGeneration, ChatSetup]:
    """The command for a chat request, and what its encoder needs. `params_for`
    builds the sampling parameters once the prompt is known (a default length
    depends on it)."""
    encoder = node.encoder_for(model.id)
    fmt = encoder.chat_format
    choice = plan.tool_choice
    tools = plan.tools or None
    if choice.mode == "named" and not any(
        t["function"]["name"] == choice.name for t in tools or []
    ):
        raise ApiError(
            400, f"tool_choice names `{choice.name}`, which is not in tools.", param="tool_choice"
        )
    if choice.forced and not tools:
        raise ApiError(
            400, "tool_choice forces a call but there are no tools.", param="tool_choice"
        )
    # tool_choice "none": the tools are not shown to the model at all.
    shown = tools if choice.mode != "none" else None
    prompt = encoder.chat_tokens(plan.messages, shown, plan.thinking)
    grammar = structured_grammar(
        fmt,
        shown,
        choice,
        plan.schema,
        plan.json_mode,
        schema_param=plan.schema_param,
        tools_param=plan.tools_param,
    )
    thinks_first = fmt.prompt_thinks(prompt)
    thinking = None
    # A constrained request thinks before its constrained output only when it
    # asked to think (or the template opened the section): by default the
    # grammar applies from the first token, so the output is what was asked for.
    may_think = fmt.has_thinking and (plan.thinking is True or thinks_first)
    if (grammar is not None or plan.thinking_budget is not None) and may_think:
        if fmt.think_start_id is None or fmt.think_end_id is None:
            if plan.thinking_budget is not None:
                raise ApiError(
                    400,
                    "This model's thinking markers are not single tokens; "
                    "a thinking budget cannot be applied.",
                    param="thinking",
                )
        else:
            thinking = ThinkingControl(
                start=fmt.think_start_id,
                end=fmt.think_end_id,
                inside=thinks_first,
                budget=plan.thinking_budget,
            )
    params = msgspec.structs.replace(params_for(prompt), grammar=grammar, thinking=thinking)
    command = plan_generation(node, model, prompt, params, request_id, prompt_param, client_id)
    setup = ChatSetup(
        fmt=fmt,
        tools=shown,
        thinks_first=thinks_first,
        new_id=lambda: node.seams.new_id("call"),
        forced=choice.forced,
    )
    return command, setup


def logprob_chunks(chunks: list[ChunkGenerated]) -> list[ChunkGenerated]:
    """The chunks that carry logprobs (all of them, when requested)."""
    return [c for c in chunks if c.logprob is not None]
