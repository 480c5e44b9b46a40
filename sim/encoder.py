"""A trivial, deterministic PromptEncoder for the simulator (no tokenizer, no MLX).

One token per character (its code point), with a `role: content` line per chat
message. Every simulated client puts a tag (`sim-req-<n>`) in its prompt, so the
fake runner can tell which client a command came from without trusting ids.
"""

from __future__ import annotations

import re

TAG = "sim-req-"
_TAG_RE = re.compile(TAG + r"(\d+)")
EOS = 0


def tag_text(client: int) -> str:
    return f"{TAG}{client}"


class SimEncoder:
    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"{m.get('role', '')}: {m.get('content', '')}\n" for m in messages)
        return [ord(c) for c in text + "assistant: "]

    def text_tokens(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    @property
    def eos_token_ids(self) -> list[int]:
        return [EOS]


def client_of(prompt_tokens: list[int]) -> int | None:
    """The client tag in a prompt, or None."""
    try:
        text = "".join(map(chr, prompt_tokens))
    except (ValueError, OverflowError):
        return None
    matches = _TAG_RE.findall(text)
    return int(matches[-1]) if matches else None
