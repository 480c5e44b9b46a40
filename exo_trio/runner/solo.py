"""One sequence on a plain KV cache, decoded the way mlx-lm's `generate_step` does.

A request that starts alone on the runner is prefilled here (its first token
sampled at once) and keeps decoding here instead of in BatchGenerator, because a
batch of one pays for the batch machinery (a `BatchKVCache` with its masks and
offsets, per-step batch bookkeeping): measured on this project's 2-core machine,
BatchGenerator with one sequence decodes 3-5% slower than `stream_generate` on
the same model. When a second request arrives, the engine hands the sequence (its
cache, the tokens in it, its next token) to BatchGenerator and batching takes
over.

The arithmetic is mlx-lm's: the prompt but its last token in chunks of
`prefill_step_size`, then one token per forward pass; logits through the
request's processors (with the tokens so far as context), normalised to
log-probabilities, then the request's sampler. Greedy output is therefore the
same token for token as `stream_generate`'s, and a seeded sampler is called once
per token, in the same order as BatchGenerator would call it.

Pipelining as in `generate_step`: the forward pass for the next token is queued
(`mx.async_eval`) before the current token is read back, so the model computes
while the runner emits. What that overlap is worth depends on the machine: on a
GPU the host's graph building is hidden behind the kernels; on a CPU core that
the model's thread shares with the runner's nothing is hidden but a thread
hand-off (measured here: 9% of the demo model's 2 ms step, nothing of the
~94M-parameter model's 37 ms one). Its price is paid by a request that arrives
meanwhile: the queued pass runs before the newcomer's prefill can start, a whole
decode step later. So the decoder measures it: a few steps with, a few without
(medians of the step times), and pipelines only where it saves more than
PIPELINE_MIN_GAIN; again every PROBE_EVERY steps, as the load changes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

Sampler = Callable[[mx.array], mx.array]

# Pipeline where it makes a decode step this much shorter (the single-stream
# target allows 2% below mlx-lm).
PIPELINE_MIN_GAIN = 0.02
# The probe: after WARMUP steps, PROBE_STEPS steps each way (median step times);
# again every PROBE_EVERY steps.
WARMUP = 3
PROBE_STEPS = 6
PROBE_EVERY = 256


class SoloDecoder:
    def __init__(
        self,
        model: Any,
        sampler: Sampler,
        processors: list[Any],
        *,
        prefill_step_size: int,
        stream: mx.Stream,
        adaptive: bool = True,
        cache: list[Any] | None = None,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.processors = processors
        self.prefill_step_size = prefill_step_size
        self.stream = stream
        # A prefix cache hit's layers, or a fresh cache (see prefill()).
        self.cache: list[Any] = make_prompt_cache(model) if cache is None else cache
        self.cached: list[int] = []  # the tokens in the cache, in order
        self._context: mx.array | None = None  # processors' view: cached + input
        self._next: mx.array | None = None  # sampled, not yet read back
        self._next_logprobs: mx.array | None = None  # the distribution it was drawn from
        # The distribution the token prefill() or advance() last returned was
        # drawn from (what the sampler saw), for requests that report logprobs.
        self.logprobs: mx.array | None = None
        self._input: int | None = None  # emitted, to be fed in by the next advance()
        self.pipelined = True
        self.adaptive = adaptive  # False: always pipeline (sharded ranks must agree)
        self._steps = 0  # advance() calls
        self._returned: float | None = None  # when advance() last returned
        self._was_ahead = True  # how the last advance() left the next step
        self._probe: dict[bool, list[float]] = {True: [], False: []}  # step times

    def prefill(self, prompt: list[int], cached: int = 0) -> int:
        """Run the prompt through the model and return the first sampled token.
        The cache already holds `prompt[:cached]` (a prefix cache hit).

        mlx-lm's way: the rest of the prompt but its last token in chunks, then the
        last token in a forward pass of its own, whose logits are sampled; so greedy
        output is `stream_generate`'s token for token (given the same cached
        prefix). A request that joins others is prefilled in one pass instead, a
        step sooner (prefill.py)."""
        step = self.prefill_step_size
        head, last = prompt[cached:-1], prompt[-1:]
        with mx.stream(self.stream):
            for start in range(0, len(head), step):
                self.model(mx.array([head[start : start + step]]), cache=self.cache)
                mx.eval([c.state for c in self.cache])
            if head:
                mx.clear_cache()
            if self.processors:
                self._context = mx.array(prompt[:-1], dtype=mx.int32)
            sampled, self.logprobs = self._forward(mx.array(last))
            mx.eval(sampled)
        self.cached = list(prompt)
        return int(sampled.item())

    def queue(self, token: int) -> None:
        """`token` (emitted) is the next input: the forward pass after it starts
        now when pipelining, else in advance()."""
        self._input = token
        if self.pipelined:
            self._feed_input()

    def advance(self, *, queue_next: bool) -> int:
        """The next token. With queue_next the token after it is wanted too: when
        pipelining, its forward pass starts before this one is read back."""
        if self._next is None:
            self._feed_input()
        current = self._next
        assert current is not None
        self.logprobs = self._next_logprobs
        self._next = None
        ahead = queue_next and self.pipelined
        if ahead:
            self._launch(current)
        token = int(current.item())
        if ahead:
            self.cached.append(token)
        elif queue_next:
            self._input = token
        self._observe(ahead)
        return token

    def take_input(self) -> int | None:
        """Hand-over: the emitted token that is not in the cache yet (it is the
        next input), if nothing is computing; None while a pass is in flight."""
        token, self._input = self._input, None
        return token

    def _feed_input(self) -> None:
        """Start the forward pass on the emitted token waiting as input (it
        enters the cache)."""
        assert self._input is not None, "advance() before queue()"
        self._launch(mx.array([self._input]))
        self.cached.append(self._input)
        self._input = None

    def _launch(self, tokens: mx.array) -> None:
        with mx.stream(self.stream):
            self._next, self._next_logprobs = self._forward(tokens)
            mx.async_eval(self._next)

    def _observe(self, ahead: bool) -> None:
        """Time the step just done (from the previous return: it ran the way that
        advance() left it); within a probe, set how the next one runs, and at
        its end decide."""
        now = time.perf_counter()
        index = self._steps - WARMUP
        self._steps += 1
        if self.adaptive and self._returned is not None and index >= 0:
            phase = index % PROBE_EVERY
            if phase < 2 * PROBE_STEPS:
                probe = self._probe
                probe[self._was_ahead].append(now - self._returned)
                if phase + 1 < 2 * PROBE_STEPS:
                    self.pipelined = phase + 1 < PROBE_STEPS
                else:
                    with_ = statistics.median(probe[True] or [math.inf])
                    without = statistics.median(probe[False] or [math.inf])
                    self.pipelined = without > with_ * (1 + PIPELINE_MIN_GAIN)
                    probe[True].clear()
                    probe[False].clear()
        self._was_ahead = ahead
        self._returned = now

    def _forward(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """One forward pass on `tokens` (shape (n,)), the last position's logits
        sampled: the next token and the log-probabilities it was drawn from,
        lazily."""
        logits = self.model(tokens[None], cache=self.cache)[:, -1, :]
        if self.processors:
            assert self._context is not None
            self._context = mx.concatenate([self._context, tokens.astype(mx.int32)])
            for processor in self.processors:
                logits = processor(self._context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs), logprobs
