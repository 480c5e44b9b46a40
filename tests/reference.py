"""What mlx-lm itself produces, to compare the node's output against."""

from __future__ import annotations

from pathlib import Path

from exo_trio.prompts import HFPromptEncoder


def reference_greedy_text(model_dir: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    """What mlx-lm itself generates greedily, EOS banned, for the same chat prompt."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_dir))
    prompt = HFPromptEncoder(model_dir).chat_tokens(messages)
    eos = sorted(tokenizer.eos_token_ids)

    def ban(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[:, eos] = -1e9
        return logits

    pieces = stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=max_tokens,
        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
        logits_processors=[ban],
    )
    return "".join(piece.text for piece in pieces)
