"""Turning chat messages and text into prompt token ids, on the node.

The node tokenizes (not the runner) so that it can reject a prompt longer than the
model's context with a 400 before anything is dispatched, and count prompt tokens
for usage. The simulator hands in its own encoder through the same protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class PromptEncoder(Protocol):
    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]: ...

    def text_tokens(self, text: str) -> list[int]: ...

    @property
    def eos_token_ids(self) -> list[int]: ...


class HFPromptEncoder:
    """The model directory's own tokenizer and chat template (via mlx-lm)."""

    def __init__(self, model_path: Path) -> None:
        # The same loader mlx_lm.load() uses, so the node and the runner agree on
        # the chat template and the EOS ids.
        from mlx_lm.utils import load_config, load_tokenizer

        eos = load_config(model_path).get("eos_token_id")
        self._tokenizer = load_tokenizer(model_path, eos_token_ids=eos)

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        tokens = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
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


def context_length(model_path: Path, default: int = 4096) -> int:
    """The model's context window, from its config.json."""
    config = json.loads((model_path / "config.json").read_text())
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return default
