"""A trivial, deterministic PromptEncoder for the simulator (no tokenizer, no MLX).

One token per character (its code point), with a `role: content` line per chat
message. Every simulated client puts a tag (`sim-req-<n>`) in its prompt, so the
fake runner can tell which client a command came from without trusting ids.
"""

from __future__ import annotations

import json
import re
from typing import Any

from exo_trio.chat_output import ChatFormat, json_tool_parser

TAG = "sim-req-"
_TAG_RE = re.compile(TAG + r"(\d+)")
EOS = 0


def tag_text(client: int) -> str:
    return f"{TAG}{client}"


# Markers as plain text (one token per character here), the json_tools format.
SIM_FORMAT = ChatFormat(
    think_start="<think>",
    think_end="</think>",
    tool_call_start="<tool_call>",
    tool_call_end="</tool_call>",
    tool_format="json_tools",
    tool_parser=json_tool_parser,
)


class SimEncoder:
    def chat_tokens(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        thinking: bool | None = None,
    ) -> list[int]:
        text = ""
        if tools:
            names = [t.get("function", {}).get("name", "") for t in tools]
            text += f"tools: {','.join(names)}\n"
        for m in messages:
            content = m.get("content", "")
            if not isinstance(content, str):
                content = json.dumps(content)
            text += f"{m.get('role', '')}: {content}"
            if m.get("tool_calls"):
                text += f" {json.dumps(m['tool_calls'], sort_keys=True)}"
            text += "\n"
        text += "assistant: "
        if thinking is False:
            text += "<think></think>"
        return [ord(c) for c in text]

    def text_tokens(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    @property
    def eos_token_ids(self) -> list[int]:
        return [EOS]

    @property
    def chat_format(self) -> ChatFormat:
        return SIM_FORMAT


def client_of(prompt_tokens: list[int]) -> int | None:
    """The client tag in a prompt, or None."""
    try:
        text = "".join(map(chr, prompt_tokens))
    except (ValueError, OverflowError):
        return None
    matches = _TAG_RE.findall(text)
    return int(matches[-1]) if matches else None
