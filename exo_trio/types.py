"""Core commands and events, as msgspec structs.

These are the only shapes that travel between the API, the worker and the runner
(and, later, between nodes). Every event names its request; every chunk carries a
per-request sequence number so a gap or a duplicate is detectable anywhere on the path.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length"]

# Why a request ended without finishing. The API maps each kind onto its dialect.
FailureKind = Literal[
    "runner_died",  # the runner process exited or its pipe broke mid-request
    "runner_unavailable",  # no live runner could take the request
    "cancelled",  # POST /v1/cancel or a shutdown ended it
    "invalid",  # the runner refused the request (e.g. a prompt longer than the context)
    "internal",  # an unexpected error inside the runner
    "peer_lost",  # the node running the request (or its link) was lost
    "timeout",  # a per-request time limit passed (api/timeouts.py)
    "shutting_down",  # the node stopped before the request finished (its drain timed out)
]


class ThinkingControl(msgspec.Struct, frozen=True, kw_only=True):
    """The model's thinking markers (single token ids) for a request that may
    think: the runner keeps a constrained request's grammar off inside the
    thinking section, and ends the section after `budget` tokens."""

    start: int
    end: int
    inside: bool = False  # the prompt opened the section (generation starts in it)
    budget: int | None = None


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens. temperature == 0 means greedy (deterministic).

    Penalties and filters apply to the logits in this order: logit_bias, the
    repeat penalty (over the last `repeat_last_n` tokens of prompt and output,
    Ollama's), presence and frequency penalties (over the output, OpenAI's), the
    grammar's mask; then the sampler filters (top_p, min_p, top_k) and draws at
    `temperature`. Logprobs are read from the distribution the sampler is given
    (after every processor, before its filters and temperature)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample from the k most likely tokens only; 0 = no limit
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = {}
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64
    # None: no logprobs; 0: each chunk carries its token's logprob; k: and the k
    # most likely tokens'.
    logprobs: int | None = None
    # An llguidance grammar (built and checked by the node: api/structured.py)
    # the output must match, or None.
    grammar: str | None = None
    thinking: ThinkingControl | None = None


class TextGeneration(msgspec.Struct, frozen=True, kw_only=True, tag="generate"):
    """Command: generate a completion for an already tokenized prompt."""

    request_id: str
    model: str
    prompt_tokens: list[int]
    params: SamplingParams
    # The id the client gave the request (its X-Request-Id header), if any: a
    # second name to cancel it by, known before any response. Runners ignore it.
    client_id: str | None = None


class Cancel(msgspec.Struct, frozen=True, kw_only=True, tag="cancel"):
    """Command: stop generating this request at the next step and free its slot."""

    request_id: str


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """A token, its log-probability, and its bytes `raw` (a token may hold part of a
    UTF-8 character, so the bytes are the exact form)."""

    token: int
    logprob: float
    raw: bytes  # the token's exact bytes


class ChunkGenerated(msgspec.Struct, frozen=True, kw_only=True, tag="chunk", omit_defaults=True):
    """One generated token. `seq` counts 0, 1, 2, ... per request; `text` is the
    detokenized text this token completes (may be empty while a multi-byte
    character or a possible stop string is held back). With logprobs requested,
    `logprob` is the token's and `top_logprobs` the most likely tokens', best
    first. Defaults are left off the wire: a chunk without logprobs is framed as
    it was before they existed (it is the one message sent per token)."""

    request_id: str
    seq: int
    token: int
    text: str
    logprob: TokenLogprob | None = None
    top_logprobs: list[TokenLogprob] = []


class GenerationFinished(msgspec.Struct, frozen=True, kw_only=True, tag="finished"):
    """Terminal event: the request completed. `chunks` is how many ChunkGenerated
    events preceded it, so the receiver can prove it saw all of them. `text` is
    any held-back text flushed at the end (normally empty)."""

    request_id: str
    chunks: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
    # Of the prompt tokens, how many the runner took from its prefix cache
    # instead of computing them (OpenAI's usage.prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0
    # Which of the request's stop strings ended it (None: EOS, length, or no
    # stop strings), for dialects that report it (Anthropic's stop_sequence).
    stop_sequence: str | None = None


class GenerationFailed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    """Terminal event: the request ended with an error. Always explicit: a request
    never just stops producing events."""

    request_id: str
    kind: FailureKind
    message: str


GenerationEvent = ChunkGenerated | GenerationFinished | GenerationFailed
TerminalEvent = GenerationFinished | GenerationFailed


def is_terminal(event: GenerationEvent) -> bool:
    return not isinstance(event, ChunkGenerated)
