"""Message content as the dialects send it: a string or a list of typed parts.

This runtime serves text models, so every dialect flattens content to text for
the chat template, and refuses (400, naming the part) what it cannot honour
(images, tool calls) rather than silently dropping it.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from exo_trio.api.errors import ApiError


class TextPart(msgspec.Struct, kw_only=True):
    """A content part or block: `{"type": "text", "text": ...}` and its cousins
    (`input_text`, `output_text` in the Responses API). Other keys are ignored."""

    type: str
    text: str | None = None


def text_of(
    content: str | Sequence[TextPart] | None, where: str, kinds: Sequence[str] = ("text",)
) -> str:
    """Flatten string or part-list content to text; `where` names it in errors."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in kinds or part.text is None:
            raise ApiError(
                400,
                f"Content type `{part.type}` is not supported; only "
                + ", ".join(f"`{k}`" for k in kinds)
                + " parts are.",
                param=f"{where}[{j}]",
            )
        texts.append(part.text)
    return "".join(texts)
