"""What a chat model's output holds: text, thinking, tool calls; split as it streams.

A model marks its thinking and its tool calls with the markers its tokenizer
declares (mlx-lm's `TokenizerWrapper` knows them: `<think>`/`</think>`,
`<tool_call>`/`</tool_call>`, `[TOOL_CALLS]`, ...), and writes each call in its
own format, which the parser mlx-lm ships for it reads (`ChatFormat`). The
`OutputSplitter` reads the generated text piece by piece, as the runner sends
it, and says which text is the answer, which is thinking, and which call is
complete: text outside calls streams as it comes (only what could be the start
of a marker is held back), a call is given whole once its end marker arrives,
because only a complete call can be parsed with the model's own parser.

Nothing is dropped: text of a call that does not parse (or never ends) comes
back as text, markers included. Pure Python: the node, the simulator and the
fuzzers all use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ChatFormat", "OutputSplitter", "Part", "ToolCall", "json_tool_parser"]

Channel = Literal["text", "thinking"]
ToolParser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class Part:
    """A piece of output: text of a channel, or one complete tool call."""

    channel: Channel | Literal["tool"]
    text: str = ""
    call: ToolCall | None = None


def json_tool_parser(text: str, tools: Any = None) -> dict[str, Any]:
    """The json_tools format (Qwen2.5, Qwen3, Hermes): one JSON object with
    `name` and `arguments`, as mlx-lm's json_tools parser reads it."""
    return json.loads(text.strip())


@dataclass(frozen=True)
class ChatFormat:
    """A model's output markers and tool-call format (None where it has none).

    `think_start_id` / `think_end_id` are set when a marker is a single token
    (the runner's thinking rules need that); `prompt_thinks(tokens)` says whether
    a prompt leaves the model inside a thinking section (templates of reasoning
    models open it in the generation prompt)."""

    think_start: str | None = None
    think_end: str | None = None
    think_start_id: int | None = None
    think_end_id: int | None = None
    tool_call_start: str | None = None
    tool_call_end: str | None = None
    tool_call_start_id: int | None = None
    tool_call_end_id: int | None = None
    tool_format: str | None = None  # mlx-lm's parser name: "json_tools", "mistral", ...
    tool_parser: ToolParser | None = None

    @property
    def has_thinking(self) -> bool:
        return self.think_start is not None and self.think_end is not None

    @property
    def has_tools(self) -> bool:
        return self.tool_call_start is not None and self.tool_parser is not None

    def prompt_thinks(self, tokens: list[int]) -> bool:
        if self.think_start_id is None or self.think_end_id is None:
            return False
        start = _rfind(tokens, self.think_start_id)
        return start >= 0 and start > _rfind(tokens, self.think_end_id)


def _rfind(tokens: list[int], token: int) -> int:
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] == token:
            return i
    return -1


@dataclass
class OutputSplitter:
    """Splits one response's text into Parts as it streams (see module doc).

    `tools` is the request's tool list (the model's parser may need their
    schemas); without it (or with tool_choice "none") calls are not looked for
    and a call marker is ordinary text. `new_id` names each call."""

    fmt: ChatFormat
    new_id: Callable[[], str]
    tools: list[dict[str, Any]] | None = None
    thinking: bool = False  # the prompt left the model inside a thinking section
    _state: str = field(init=False)
    _buffer: str = field(init=False, default="")
    _call_text: str = field(init=False, default="")
    _merge: bool = field(init=False, default=False)  # the next text continues the last part
    calls: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._state = "thinking" if self.thinking else "text"

    def _transitions(self) -> list[tuple[str, str]]:
        """(marker, next state) pairs that apply in the current state."""
        fmt = self.fmt
        calls = self.tools is not None and fmt.has_tools and fmt.tool_call_start
        out: list[tuple[str, str]] = []
        if self._state == "text":
            if fmt.has_thinking:
                out.append((fmt.think_start or "", "thinking"))
            if calls:
                out.append((fmt.tool_call_start or "", "tool"))
        elif self._state == "thinking":
            if fmt.think_end:
                out.append((fmt.think_end, "text"))
            if calls:
                out.append((fmt.tool_call_start or "", "tool"))
        elif self._state == "tool" and fmt.tool_call_end:
            out.append((fmt.tool_call_end, "text"))
        return [(m, s) for m, s in out if m]

    def push(self, text: str) -> list[Part]:
        """The parts `text` completes (possibly none: a marker may be starting)."""
        parts: list[Part] = []
        buffer = self._buffer + text
        while True:
            transitions = self._transitions()
            hit = None
            for marker, state in transitions:
                at = buffer.find(marker)
                if at >= 0 and (hit is None or at < hit[0]):
                    hit = (at, marker, state)
            if hit is None:
                break
            at, marker, state = hit
            self._emit(buffer[:at], parts)
            if self._state == "tool":
                parts.extend(self._end_call(closed=True))
            self._state = state
            self._merge = False  # a new section: a new part
            if state == "tool":
                self._call_text = ""
            buffer = buffer[at + len(marker) :]
        # Hold back the longest tail that could start a marker of this state.
        hold = 0
        for marker, _ in self._transitions():
            for length in range(min(len(marker) - 1, len(buffer)), 0, -1):
                if buffer.endswith(marker[:length]):
                    hold = max(hold, length)
                    break
        self._emit(buffer[: len(buffer) - hold], parts)
        self._buffer = buffer[len(buffer) - hold :]
        return parts

    def finish(self) -> list[Part]:
        """The end of the output: whatever is held back, and a call without an
        end marker (formats such as Mistral's end a call at EOS)."""
        parts: list[Part] = []
        self._emit(self._buffer, parts)
        self._buffer = ""
        if self._state == "tool":
            parts.extend(self._end_call(closed=False))
            self._state = "text"
        return parts

    def _emit(self, text: str, parts: list[Part]) -> None:
        if not text:
            return
        if self._state == "tool":
            self._call_text += text
        elif self._merge and parts and parts[-1].channel == self._state:
            parts[-1] = Part(parts[-1].channel, parts[-1].text + text)  # type: ignore[arg-type]
        else:
            parts.append(Part(self._state, text))  # type: ignore[arg-type]
            self._merge = True

    def _end_call(self, *, closed: bool) -> list[Part]:
        raw, self._call_text = self._call_text, ""
        calls = self._parse(raw)
        if calls is None:
            # Not a call after all: give it back as text, markers included.
            marker_end = (self.fmt.tool_call_end or "") if closed else ""
            return [Part("text", (self.fmt.tool_call_start or "") + raw + marker_end)]
        self.calls += len(calls)
        return [Part("tool", call=call) for call in calls]

    def _parse(self, raw: str) -> list[ToolCall] | None:
        parser = self.fmt.tool_parser
        assert parser is not None
        try:
            parsed = parser(raw, self.tools)
        except Exception:  # the model's parser raises anything on malformed text
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(self.new_id(), item["name"], arguments))
        return calls
