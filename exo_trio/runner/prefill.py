"""Prefilling several prompts in one padded forward pass, first tokens included.

The engine starts requests here when they join others (solo.py prefills a request
that starts alone, the way mlx-lm does). Each row is a prompt and what a prefix
cache hit already holds of it; one call runs every row's remaining tokens through
the model together and samples every row's first token from the same pass, so a
burst of requests gets its first tokens at the end of one step.

How rows of different lengths share a pass. Rows are aligned at the right: all
end in the same column, so the last position's logits are every row's next-token
logits (the logits of the other positions are never computed: only the last
pass asks for logits, and only its last `tail` columns go through it). A row
whose uncached part is shorter than the longest one's recomputes the end of its
cached prefix instead of padding (the same positions are computed either way, and
the cached part then stays contiguous with the rest); a row with too little
cached for that is padded on the left, masked out through the batch cache's left
padding, exactly as mlx-lm's `BatchKVCache` pads a fresh batch. So a row's
arithmetic can differ from an unpadded pass in the last bits, as any padded
batch's does.

mlx-lm's own batched prefill (`PromptProcessingBatch`) pads on the right and
computes the first tokens in a further pass over the batch's last prompt tokens;
on a CPU such a pass costs about what a decode step does, which this saves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

__all__ = ["LOGITS_BUDGET", "Row", "prefill_rows"]

Sampler = Callable[[mx.array], mx.array]
# The last pass computes logits for rows x tail columns; keep that under this many
# values (64 MB of float32) by ending with a shorter tail pass for large vocabularies.
LOGITS_BUDGET = 1 << 24


@dataclass
class Row:
    """One prompt to prefill. `cache` holds `prompt[:cached]` (a prefix cache hit,
    or nothing); afterwards `cache` holds the whole prompt and `cached` says how
    much of the hit was actually used."""

    prompt: list[int]
    cached: int
    cache: list[KVCache]
    sampler: Sampler
    processors: Sequence[Any] = ()
    first_token: int = field(default=-1, init=False)
    # The log-probabilities the first token was drawn from (for requests that
    # report logprobs), lazily.
    logprobs: mx.array | None = field(default=None, init=False)


def prefill_rows(
    model: Any,
    rows: list[Row],
    *,
    prefill_step_size: int,
    vocab_size: int,
    stream: mx.Stream,
) -> None:
    """Run the rows' uncached tokens through the model as one batch and sample each
    row's first token (`row.first_token`); each row's `cache` then holds its prompt."""
    if not rows:
        return
    with mx.stream(stream):
        if len(rows) == 1:
            _prefill_one(model, rows[0], prefill_step_size, vocab_size)
        else:
            _prefill_batch(model, rows, prefill_step_size, vocab_size)


def _prefill_one(model: Any, row: Row, step: int, vocab_size: int) -> None:
    suffix = mx.array([row.prompt[row.cached :]])
    logits = _run(model, suffix, row.cache, step, vocab_size)
    _sample([row], logits)


def _prefill_batch(model: Any, rows: list[Row], step: int, vocab_size: int) -> None:
    width = max(len(r.prompt) - r.cached for r in rows)
    pads = []
    for row in rows:
        # Recompute the end of the cached prefix rather than pad (see the module
        # docstring); pad only what the prefix cannot cover.
        row.cached = max(0, row.cached - (width - (len(row.prompt) - row.cached)))
        for layer in row.cache:
            layer.offset = min(layer.offset, row.cached)
        pads.append(width - (len(row.prompt) - row.cached))
    batch = [
        KVCache.merge([row.cache[layer] for row in rows]) for layer in range(len(rows[0].cache))
    ]
    if any(pads):
        padding = mx.array(pads)
        for layer in batch:
            if layer.keys is None:
                layer.prepare(left_padding=pads)
            else:
                # Only rows with nothing cached are padded here (see above), so
                # their padding runs on from the merged cache's left padding: the
                # same state `prepare` makes for an empty batch cache.
                layer.left_padding = layer.left_padding + padding
                layer.offset = layer.offset - padding
    tokens = mx.array(
        [[0] * pad + row.prompt[row.cached :] for pad, row in zip(pads, rows, strict=True)]
    )
    logits = _run(model, tokens, batch, step, vocab_size)
    _sample(rows, logits)
    for index, row in enumerate(rows):
        row.cache = [layer.extract(index) for layer in batch]


def _run(model: Any, tokens: mx.array, cache: list[Any], step: int, vocab_size: int) -> mx.array:
    """Feed `tokens` (rows x columns) in chunks of `step` columns; returns the last
    column's logits. Only the last chunk's logits are ever computed (lazily, MLX
    evaluates just the cache states of the others), and that chunk is at most as
    many columns as keep its logits within LOGITS_BUDGET."""
    rows, columns = tokens.shape
    tail = max(1, min(step, columns, LOGITS_BUDGET // max(1, rows * vocab_size)))
    head = columns - tail
    for start in range(0, head, step):
        model(tokens[:, start : min(start + step, head)], cache=cache)
        mx.eval([c.state for c in cache])
    if head:
        mx.clear_cache()
    return model(tokens[:, head:], cache=cache)[:, -1, :]


def _sample(rows: list[Row], logits: mx.array) -> None:
    """Each row's processors (with its whole prompt as context), normalisation to
    log-probabilities, then its sampler: what BatchGenerator does for a token."""
    if any(row.processors for row in rows):
        processed = []
        for index, row in enumerate(rows):
            row_logits = logits[index : index + 1]
            if row.processors:
                context = mx.array(row.prompt, dtype=mx.int32)
                for processor in row.processors:
                    row_logits = processor(context, row_logits)
            processed.append(row_logits)
        logits = mx.concatenate(processed, axis=0)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    samplers = [row.sampler for row in rows]
    if all(s is samplers[0] for s in samplers):
        sampled = samplers[0](logprobs)
    else:
        sampled = mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)], axis=0)
    for index, (row, token) in enumerate(zip(rows, sampled.tolist(), strict=True)):
        row.first_token = int(token)
        row.logprobs = logprobs[index]
