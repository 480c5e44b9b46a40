"""Turning chat messages and text into prompt token ids, on the node.

The node tokenizes (not the runner) so that it can reject a prompt longer than the
model's context with a 400 before anything is dispatched, and count prompt tokens
for usage. The simulator hands in its own encoder through the same protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from exo_trio.chat_output import ChatFormat


class PromptEncoder(Protocol):
    def chat_tokens(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        thinking: bool | None = None,
    ) -> list[int]:
        """The prompt for a conversation: `tools` (OpenAI function format) go to
        the chat template, `thinking` switches the template's thinking on or off
        (None: the template's default)."""
        ...

    def text_tokens(self, text: str) -> list[int]: ...

    @property
    def eos_token_ids(self) -> list[int]: ...

    @property
    def chat_format(self) -> ChatFormat:
        """The model's thinking markers and tool-call format."""
        ...


class HFPromptEncoder:
    """The model directory's own tokenizer and chat template (via mlx-lm)."""

    def __init__(self, model_path: Path) -> None:
        # The same loader mlx_lm.load() uses, so the node and the runner agree on
        # the chat template and the EOS ids.
        from mlx_lm.utils import load_config, load_tokenizer

        eos = load_config(model_path).get("eos_token_id")
        self._tokenizer = load_tokenizer(model_path, eos_token_ids=eos)
        self._format = chat_format_of(self._tokenizer)

    def chat_tokens(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        thinking: bool | None = None,
    ) -> list[int]:
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = tools
        if thinking is not None:
            extra["enable_thinking"] = thinking
        tokens = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **extra
        )
        # transformers 5 may hand back a BatchEncoding-like mapping.
        if isinstance(tokens, dict) or hasattr(tokens, "input_ids"):
            tokens = tokens["input_ids"]
        return [int(t) for t in tokens]

    def text_tokens(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text, add_special_tokens=False)]

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(int(t) for t in self._tokenizer.eos_token_ids)

    @property
    def chat_format(self) -> ChatFormat:
        return self._format


def chat_format_of(tokenizer: Any) -> ChatFormat:
    """What mlx-lm's TokenizerWrapper declares: thinking markers (and their ids
    when single tokens) and the tool-call format with its parser."""

    def single(tokens: Any) -> int | None:
        return int(tokens[0]) if tokens is not None and len(tokens) == 1 else None

    tool_format = None
    if tokenizer.has_tool_calling:
        tool_format = getattr(tokenizer, "init_kwargs", {}).get("tool_parser_type")
    return ChatFormat(
        think_start=tokenizer.think_start,
        think_end=tokenizer.think_end,
        think_start_id=single(tokenizer.think_start_tokens),
        think_end_id=single(tokenizer.think_end_tokens),
        tool_call_start=tokenizer.tool_call_start,
        tool_call_end=tokenizer.tool_call_end or None,
        tool_call_start_id=single(tokenizer.tool_call_start_tokens),
        tool_call_end_id=single(tokenizer.tool_call_end_tokens),
        tool_format=tool_format,
        tool_parser=tokenizer.tool_parser,
    )


def context_length(model_path: Path, default: int = 4096) -> int:
    """The model's context window, from its config.json."""
    config = json.loads((model_path / "config.json").read_text())
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return default
