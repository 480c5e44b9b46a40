"""Grammars for constrained decoding, built and checked on the node.

Every structured-output request of every dialect becomes one llguidance grammar
here: a JSON schema (OpenAI `response_format`, Responses `text.format`, Ollama
`format`), a forced tool call in the model's own call format (`tool_choice`
required or named, Anthropic's any / tool), or a choice between the two. The
grammar is compiled once here to check it, so a schema the engine cannot handle
is a 400 naming it before anything is dispatched; the runner compiles it again
against its vocabulary and masks every token that would leave the language
(runner/guide.py).

JSON is generated compact with a space after `:` and `,` (what json.dumps and
chat templates' `tojson` write), with no other whitespace: a model then writes
JSON the way it saw JSON in training, and a random-weight model cannot wander
off into whitespace forever.

The grammar engine is llguidance (docs/api.md, "Structured output", has the
measurements behind the choice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from exo_trio.api.errors import ApiError
from exo_trio.chat_output import ChatFormat

__all__ = ["ToolChoice", "check_grammar", "json_grammar", "structured_grammar"]

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Formats whose calls we can write a grammar for (a forced call needs one).
FORCEABLE_FORMATS = ("json_tools",)


@dataclass(frozen=True)
class ToolChoice:
    """What a request lets the model do with its tools, in any dialect."""

    mode: str = "auto"  # "auto" | "none" | "required" | "named"
    name: str | None = None  # the function, for "named"
    parallel: bool = True  # more than one call in a turn

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def _closed(schema: Any) -> Any:
    """The schema with every object that declares its properties closed to
    others (`additionalProperties: false` where it is not said): what is
    generated still validates against the schema as given, and a model cannot
    invent keys forever. Clients that drop `additionalProperties` on the way
    (the ollama client's Tool model does) get the calls they meant."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        if "patternProperties" not in out:
            out["additionalProperties"] = False
    return out


def _styled(schema: dict[str, Any]) -> dict[str, Any]:
    guidance = dict(schema.get("x-guidance") or {}) if isinstance(schema, dict) else {}
    return {**_closed(schema), "x-guidance": {**guidance, **JSON_STYLE}}


def json_grammar(schema: dict[str, Any] | None, param: str) -> str:
    """A grammar for one JSON value of `schema` (None: any JSON object)."""
    if schema is not None and not isinstance(schema, dict):
        raise ApiError(400, f"`{param}` must be a JSON schema object.", param=param)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            _styled(schema if schema is not None else {"type": "object"})
        )
    except (ValueError, TypeError) as exc:
        raise ApiError(
            400, f"The JSON schema in `{param}` is invalid: {exc}", param=param
        ) from None
    check_grammar(grammar, param)
    return grammar


def check_grammar(grammar: str, param: str) -> None:
    """Compile the grammar (without a vocabulary) and refuse it with a 400 naming
    `param` if the engine cannot."""
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ApiError(
            400,
            f"The schema in `{param}` cannot be used for constrained decoding: {error}",
            param=param,
        )


def _marker(text: str, token: int | None) -> str:
    """A marker in lark: its token when it is one (special or not), else its text."""
    return f"<[{token}]>" if token is not None else json.dumps(text)


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _calls_lark(fmt: ChatFormat, tools: list[dict[str, Any]], choice: ToolChoice) -> str:
    """Lark rules whose `calls` rule is one call (or several, when parallel) of
    the allowed tools, in the json_tools format: <tool_call>\\n{...}\\n</tool_call>."""
    assert fmt.tool_call_start is not None and fmt.tool_call_end is not None
    allowed = [t for t in tools if choice.mode != "named" or t["function"]["name"] == choice.name]
    start = _marker(fmt.tool_call_start, fmt.tool_call_start_id)
    end = _marker(fmt.tool_call_end, fmt.tool_call_end_id)
    lines = []
    names = []
    for i, tool in enumerate(allowed):
        names.append(f"fn{i}")
        lines.append(f"fn{i}: %json {json.dumps(_styled(_call_schema(tool)))}")
    calls = 'call ("\\n" call)*' if choice.parallel else "call"
    return "\n".join(
        [
            f"calls: {calls}",
            f'call: {start} "\\n" ({" | ".join(names)}) "\\n" {end}',
            *lines,
        ]
    )


def structured_grammar(
    fmt: ChatFormat,
    tools: list[dict[str, Any]] | None,
    choice: ToolChoice,
    schema: dict[str, Any] | None,
    json_mode: bool,
    *,
    schema_param: str,
    tools_param: str = "tools",
) -> str | None:
    """The grammar a chat request's output must match, or None (free text).

    * a forced call (required / named): the calls, nothing else;
    * a response format (a schema, or any JSON object): that JSON; with tools
      the model may call them instead (auto), so: calls or the JSON;
    * otherwise none."""
    calls = None
    if tools and choice.mode != "none" and (choice.forced or schema is not None or json_mode):
        if fmt.tool_format not in FORCEABLE_FORMATS or fmt.tool_call_end is None:
            if choice.forced:
                raise ApiError(
                    400,
                    "This model's tool-call format "
                    f"({fmt.tool_format or 'none declared'}) cannot be forced; "
                    "only `auto` and `none` are supported for it.",
                    param="tool_choice",
                )
        else:
            calls = _calls_lark(fmt, tools, choice)
    if choice.forced and tools:
        assert calls is not None
        grammar = llguidance.LLMatcher.grammar_from_lark("start: calls\n" + calls)
        check_grammar(grammar, tools_param)
        return grammar
    if schema is None and not json_mode:
        return None
    if calls is None:
        return json_grammar(schema, schema_param)
    json_grammar(schema, schema_param)  # its own errors name its own field
    body = _styled(schema if schema is not None else {"type": "object"})
    lark = f"start: calls | answer\nanswer: %json {json.dumps(body)}\n{calls}"
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    check_grammar(grammar, tools_param)
    return grammar
