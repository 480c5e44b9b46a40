"""How one request picks its tokens: its sampler, its logits processors (bias,
penalties, the grammar's mask), and the logprobs it reports.

The engine builds a `RequestSampling` per request and hands its sampler and
processors to whichever decoder runs the request (the lone-request decoder or
BatchGenerator, which call them on that request's row only), so every request of
a batch is sampled by its own rules. Everything here is a pure function of the
request's parameters and the tokens, so the ranks of a sharded runner, given the
same commands and seeds, sample the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from exo_trio.runner.guide import Guide, Thinking
from exo_trio.types import SamplingParams, TokenLogprob

__all__ = [
    "MAX_TOP_LOGPROBS",
    "GrammarTokenizer",
    "RequestSampling",
    "TokenBytes",
    "make_sampler",
    "request_sampling",
    "token_logprobs",
]

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]

# OpenAI's limit on top_logprobs (Ollama and completions are checked against it too).
MAX_TOP_LOGPROBS = 20

# mx.random.key takes a uint64 seed; larger or negative API seeds are folded in.
_SEED_MASK = (1 << 64) - 1


def make_sampler(params: SamplingParams) -> Sampler:
    """A sampler for one request (BatchGenerator calls it on that request's row only).

    Greedy requests share mlx-lm's `greedy_sampler` object: when every request in
    the batch is greedy, BatchGenerator then samples the whole batch in one call.
    A seeded request owns a PRNG key that is split once per call, so its tokens
    depend only on its seed and its own logits, not on what else is in the batch
    or on the global MLX random state. The filters run in mlx-lm's order (top_p,
    min_p, top_k), then the temperature.
    """
    if params.temperature == 0:
        return greedy_sampler
    inv_temp = 1.0 / params.temperature
    top_p = params.top_p
    top_k = params.top_k
    min_p = params.min_p

    def scaled(logprobs: mx.array) -> mx.array:
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = apply_min_p(logprobs, min_p)
        # apply_top_k refuses k >= vocabulary size; such a k keeps every token anyway.
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        return logprobs * inv_temp

    if params.seed is None:

        def unseeded(logprobs: mx.array) -> mx.array:
            return mx.random.categorical(scaled(logprobs))

        return unseeded

    key = mx.random.key(params.seed & _SEED_MASK)

    def seeded(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.categorical(scaled(logprobs), key=sub)

    return seeded


def output_penalties(presence: float, frequency: float, vocab_size: int) -> Processor:
    """OpenAI's presence and frequency penalties, over the output only (not the
    prompt): minus `presence` for every token that occurred, minus `frequency`
    per occurrence. Computed on the device from the context, without reading
    tokens back, so the step stays pipelined."""
    base: int | None = None

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal base
        if base is None:
            base = tokens.shape[0]  # the first call sees the prompt alone
        output = tokens[base:]
        if output.size == 0:
            return logits
        counts = mx.zeros((vocab_size,), dtype=logits.dtype).at[output].add(1)
        penalty = presence * (counts > 0) + frequency * counts
        return logits - penalty.astype(logits.dtype)

    return process


def repeat_penalty(penalty: float, last_n: int) -> Processor:
    """Ollama's (llama.cpp's) repeat penalty over the last `last_n` tokens of the
    context, prompt included: mlx-lm's sign-aware repetition penalty."""
    (process,) = make_logits_processors(repetition_penalty=penalty, repetition_context_size=last_n)
    return process


class GrammarTokenizer:
    """The runner's llguidance tokenizer, built once on first use (a fraction of
    a second for the demo vocabulary, about a second per 30k tokens). A tokenizer
    llguidance cannot read (it takes Hugging Face "fast" tokenizers) leaves the
    runner without grammars: constrained requests are refused, the rest works."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: Any | None = None
        self._error: str | None = None

    def get(self) -> Any:
        """The LLTokenizer; ValueError if this model's tokenizer cannot have one."""
        if self._tokenizer is None and self._error is None:
            import llguidance.hf

            try:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            except Exception as exc:  # any failure means: no grammars for this model
                self._error = f"this model's tokenizer cannot be used for grammars: {exc!r}"
        if self._tokenizer is None:
            raise ValueError(self._error)
        return self._tokenizer

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher; raises ValueError if the grammar does not compile."""
        import llguidance

        matcher = llguidance.LLMatcher(self.get(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar does not compile: {matcher.get_error()}")
        return matcher


class TokenBytes:
    """Each token's exact bytes (for logprobs), looked up through the grammar
    tokenizer, which knows them for byte-level and SentencePiece vocabularies
    (else the token's decoded text)."""

    def __init__(self, grammar_tokenizer: GrammarTokenizer, hf_tokenizer: Any) -> None:
        self._grammar_tokenizer = grammar_tokenizer
        self._hf = hf_tokenizer
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        found = self._cache.get(token)
        if found is None:
            try:
                found = bytes(self._grammar_tokenizer.get().decode_bytes([token]))
            except ValueError:
                found = str(self._hf.decode([token])).encode()
            self._cache[token] = found
        return found


def token_logprobs(
    logprobs: mx.array, token: int, top: int, token_bytes: TokenBytes
) -> tuple[TokenLogprob, list[TokenLogprob]]:
    """The sampled token's logprob and the `top` most likely tokens' (best first,
    ties by token id; tokens the mask ruled out, at -inf, are left out)."""
    row = logprobs.reshape(-1)
    if top > 0:
        k = min(top, row.shape[0])
        ids = mx.argpartition(-row, kth=k - 1)[:k]
        values = row[ids]
        mx.eval(values, ids)
        pairs = sorted(zip(ids.tolist(), values.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
        best = [TokenLogprob(t, v, token_bytes(t)) for t, v in pairs if v != -float("inf")]
    else:
        best = []
    chosen = TokenLogprob(token, row[token].item(), token_bytes(token))
    return chosen, best


@dataclass
class RequestSampling:
    sampler: Sampler
    processors: list[Processor]
    guide: Guide | None
    logprobs: int | None  # None: none; k >= 0: the token's and the top k


def request_sampling(
    params: SamplingParams,
    *,
    vocab_size: int,
    eos_ids: frozenset[int],
    grammar_tokenizer: GrammarTokenizer | None,
) -> RequestSampling:
    """Everything one request samples with. Raises ValueError for a grammar that
    does not compile (the node checks grammars first; this is the backstop)."""
    processors: list[Processor] = list(make_logits_processors(logit_bias=params.logit_bias or None))
    if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
        last_n = params.repeat_last_n if params.repeat_last_n > 0 else 1 << 30
        processors.append(repeat_penalty(params.repeat_penalty, last_n))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            output_penalties(params.presence_penalty, params.frequency_penalty, vocab_size)
        )
    guide = None
    thinking = params.thinking
    if params.grammar is not None or (thinking is not None and thinking.budget is not None):
        matcher = None
        if params.grammar is not None:
            if grammar_tokenizer is None:
                raise ValueError("this runner cannot apply grammars")
            matcher = grammar_tokenizer.matcher(params.grammar)
        guide = Guide(
            matcher,
            vocab_size=vocab_size,
            eos_ids=eos_ids,
            thinking=None
            if thinking is None
            else Thinking(thinking.start, thinking.end, thinking.inside, thinking.budget),
        )
        # Last: the mask has the final say (a bias cannot revive a masked token).
        processors.append(guide)
    return RequestSampling(make_sampler(params), processors, guide, params.logprobs)
