"""One sequence on a plain KV cache, decoded the way mlx-lm's `generate_step` does.

The engine uses it twice. Every request it starts itself is prefilled here (its
first token sampled at once); and a request that is alone on the runner keeps
decoding here instead of in BatchGenerator, because a batch of one pays for the
batch machinery (a `BatchKVCache` with its masks and offsets, per-step batch
bookkeeping): measured on this project's 2-core machine, BatchGenerator with one
sequence decodes 3-5% slower than `stream_generate` on the same model. When a
second request arrives, the engine hands the sequence (its cache, the tokens in
it, its next token) to BatchGenerator and batching takes over.

The arithmetic is mlx-lm's: the prompt but its last token in chunks of
`prefill_step_size`, then one token per forward pass; logits through the
request's processors (with the tokens so far as context), normalised to
log-probabilities, then the request's sampler. Greedy output is therefore the
same token for token as `stream_generate`'s, and a seeded sampler is called once
per token, in the same order as BatchGenerator would call it.

Pipelining as in `generate_step`: the forward pass for the next token is queued
(`mx.async_eval`) before the current token is read back, so the model computes
while the runner emits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

Sampler = Callable[[mx.array], mx.array]


class SoloDecoder:
    def __init__(
        self,
        model: Any,
        sampler: Sampler,
        processors: list[Any],
        *,
        prefill_step_size: int,
        stream: mx.Stream,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.processors = processors
        self.prefill_step_size = prefill_step_size
        self.stream = stream
        self.cache: list[Any] = make_prompt_cache(model)
        self.cached: list[int] = []  # the tokens in the cache, in order
        self._context: mx.array | None = None  # processors' view: cached + input
        self._next: mx.array | None = None  # sampled, not yet read back

    def prefill(self, prompt: list[int], *, fused: bool = False) -> int:
        """Run the prompt through the model and return the first sampled token.

        mlx-lm's way: the prompt but its last token in chunks, then the last token
        in a forward pass of its own, whose logits are sampled. fused: the last
        chunk (the last token with the ones before it in its chunk) goes through
        in one pass instead. On a CPU a forward pass over a short prompt costs about
        what a decode step does (the weights are read once either way), so this
        saves a step of latency; its logits can differ from the two-pass ones in
        the last bits. Used for a request that joins others: its later tokens are
        computed in a padded batch anyway, whose arithmetic differs from mlx-lm's
        single-sequence one in the same way."""
        step = self.prefill_step_size
        split = (len(prompt) - 1) // step * step if fused else len(prompt) - 1
        head, last = prompt[:split], prompt[split:]
        with mx.stream(self.stream):
            for start in range(0, len(head), step):
                self.model(mx.array([head[start : start + step]]), cache=self.cache)
                mx.eval([c.state for c in self.cache])
            if head:
                mx.clear_cache()
            if self.processors:
                self._context = mx.array(head, dtype=mx.int32)
            sampled = self._forward(mx.array(last))
            mx.eval(sampled)
        self.cached = list(prompt)
        return int(sampled.item())

    def queue(self, token: int) -> None:
        """Start computing the token after `token` (which enters the cache)."""
        with mx.stream(self.stream):
            self._next = self._forward(mx.array([token]))
            mx.async_eval(self._next)
        self.cached.append(token)

    def advance(self, *, queue_next: bool) -> int:
        """The token computing now; with queue_next, the one after it starts first
        (it enters the cache), so the model keeps working while this one is used."""
        current = self._next
        assert current is not None, "advance() before queue()"
        self._next = None
        if queue_next:
            with mx.stream(self.stream):
                self._next = self._forward(current)
                mx.async_eval(self._next)
        token = int(current.item())
        if queue_next:
            self.cached.append(token)
        return token

    def _forward(self, tokens: mx.array) -> mx.array:
        """One forward pass on `tokens` (shape (n,)), the last position's logits
        sampled: the next token, lazily."""
        logits = self.model(tokens[None], cache=self.cache)[:, -1, :]
        if self.processors:
            assert self._context is not None
            self._context = mx.concatenate([self._context, tokens.astype(mx.int32)])
            for processor in self.processors:
                logits = processor(self._context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs)
