"""The synchronous MLX generation core of a runner: continuous batching, no I/O.

`Engine` turns `TextGeneration` commands into `ChunkGenerated` /
`GenerationFinished` / `GenerationFailed` events. It wraps one shared mlx-lm
`BatchGenerator`: a request submitted while others decode joins the running batch
without waiting for the others to finish.

Starting requests. The step after requests arrive starts as many as the batch has
room for and emits their first tokens: the engine prefills them itself, all in
one step (prefill.py: rows of similar length share a padded forward pass,
start_policy.py groups them), then hands each request and its filled KV cache to
the generator, which decodes them with the others from the next step on. Left to
`BatchGenerator`, a new request's first token would come out of its third
`next()` call. A request that starts alone on an idle runner is prefilled the way
mlx-lm does it and decoded outside the generator, like mlx-lm's `generate_step`,
until another one arrives (solo.py says why). Requests beyond the batch's room
wait, in order, for a slot.

The prefix cache (prefix_cache.py). When a request ends, the KV state of its
tokens is kept; a request whose prompt starts with cached tokens starts from a
copy of them and computes only the rest, in every start path.

The engine does no I/O and never blocks on anything but MLX, so it can be unit
tested directly; the runner process (loop.py, rank.py) owns the pipes and calls
`submit` / `cancel` / `step` from one thread. Its decisions depend only on the
commands it was given, never on time, so that the ranks of a split model, each
running an engine over its layers, stay in step.

Facts about `BatchGenerator` this code relies on (mlx-lm 0.32):

* `next()` returns `(prompt_responses, generation_responses)`. Each generation
  response carries one token per decoding sequence. Decoding is pipelined: the
  token returned by a call was sampled in the previous call, while the model
  already runs the forward pass that samples the next one.
* A new prompt of more than one token needs three `next()` calls before its first
  token comes out: one to prefill all but the last prompt token (more for prompts
  longer than `prefill_step_size`), one to move it into the decoding batch
  (forward pass on the last prompt token, sampling token 1), and one that
  returns token 1. A one-token prompt skips the first of these.
* `finish_reason` on a generation response is "length" when the sequence has now
  produced `max_tokens` tokens (this token included and still to be emitted) and
  "stop" when the token completed a stop sequence; "stop" wins when both hold.
  We give each request only single-token stop sequences (its EOS ids), so "stop"
  means "this token is EOS": it is not emitted and not counted. Finished
  sequences are dropped from the batch by `next()` itself.
* `remove([uid])` drops a sequence from whichever stage it is in (queued,
  prefilling, decoding); it never produces another response.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from exo_trio.runner import prefix_cache
from exo_trio.runner.guide import Guide, Verdict
from exo_trio.runner.model_files import load_lazily
from exo_trio.runner.prefill import Row, prefill_rows
from exo_trio.runner.prefix_cache import Hit, PrefixCache
from exo_trio.runner.protocol import DEFAULT_PROMPT_CACHE_BYTES, PromptCacheStats
from exo_trio.runner.sampling import (
    MAX_TOP_LOGPROBS,
    GrammarTokenizer,
    TokenBytes,
    request_sampling,
    token_logprobs,
)
from exo_trio.runner.solo import SoloDecoder
from exo_trio.runner.start_policy import prefill_groups
from exo_trio.runner.stop_strings import StopStringMatcher
from exo_trio.types import (
    ChunkGenerated,
    FailureKind,
    FinishReason,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    TextGeneration,
)

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "DEFAULT_PROMPT_CACHE_BYTES",
    "Engine",
    "ModelHook",
    "ProgressCallback",
]

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 4096
ProgressCallback = Callable[[float, str], None]
# Called on the lazily loaded model (and its config) before any weight is read;
# returns the model to serve. Sharding cuts the model down here (layer_split.py).
ModelHook = Callable[[Any, dict[str, Any]], Any]
Sampler = Callable[[mx.array], mx.array]

# Weight of the newest decode step in the step time estimate (step_seconds).
_STEP_EMA = 0.2


@dataclass
class _Request:
    """Per-request state the BatchGenerator does not keep for us."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool
    sampler: Sampler
    processors: list[Any]
    detokenizer: StreamingDetokenizer
    stops: StopStringMatcher
    # The request's grammar / thinking state (runner/guide.py), if constrained.
    guide: Guide | None = None
    logprobs: int | None = None  # report logprobs: the token's and this many top ones
    uid: int | None = None  # the generator's id, once inserted
    seq: int = 0  # chunks emitted so far == next chunk's seq == completion tokens
    cached: int = 0  # prompt tokens taken from the prefix cache

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


class Engine:
    """Continuous-batching generation over one model. Not thread safe: one caller."""

    def __init__(
        self,
        model: Any,
        tokenizer: TokenizerWrapper,
        *,
        model_id: str,
        context_length: int,
        vocab_size: int,
        max_batch: int = 16,
        prefill_step_size: int = 2048,
        recover_step_errors: bool = True,
        adaptive_pipelining: bool = True,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        kv_bytes_per_token: int = 0,
        step_seconds: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        # A failed step normally fails the batch and carries on with a fresh
        # generator. A sharded runner must not: its ranks would stop agreeing on
        # the batch, so the error propagates and ends the runner.
        self.recover_step_errors = recover_step_errors
        # A lone request's decoder times its steps to decide whether to pipeline
        # them (solo.py). A sharded runner's ranks must compute the same passes in
        # the same order, so they never decide on their own timing: always pipeline.
        self.adaptive_pipelining = adaptive_pipelining
        self.eos_token_ids: frozenset[int] = frozenset(tokenizer.eos_token_ids)
        # StopSequences are immutable automata (each sequence gets its own matcher
        # inside the generator), so two shared instances cover every request.
        self._eos_stops = StopSequences([[t] for t in sorted(self.eos_token_ids)])
        self._no_stops = StopSequences()
        self._requests: dict[str, _Request] = {}
        self._by_uid: dict[int, _Request] = {}
        # Submitted, not yet started, in order: steps start them as slots allow.
        self._pending: list[_Request] = []
        # A request decoding alone, outside the generator (solo.py).
        self._solo: tuple[_Request, SoloDecoder] | None = None
        self._steps = 0
        # The recent decode step, seconds (for the runner's start policy; never
        # used for a decision of the engine's own, see the module docstring).
        self.step_seconds = step_seconds
        self.prompt_cache_off_reason = prefix_cache.supported(make_prompt_cache(model))
        if kv_bytes_per_token <= 0 and self.prompt_cache_off_reason is None:
            self.prompt_cache_off_reason = "the KV bytes per token are unknown"
        capacity = 0
        if self.prompt_cache_off_reason is None:
            capacity = max(0, prompt_cache_bytes) // kv_bytes_per_token
        self._prefix = PrefixCache(capacity, max(1, kv_bytes_per_token))
        self._lookups = self._hits = self._tokens_reused = 0
        self._generator = self._new_generator()
        # Grammars and logprob bytes need llguidance's view of the vocabulary.
        hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        self.grammar_tokenizer = GrammarTokenizer(hf_tokenizer, vocab_size)
        self.token_bytes = TokenBytes(self.grammar_tokenizer, hf_tokenizer)

    # -- construction -------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_path: Path,
        model_id: str,
        max_batch: int = 16,
        on_progress: ProgressCallback | None = None,
        prepare: ModelHook | None = None,
        recover_step_errors: bool = True,
        adaptive_pipelining: bool = True,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    ) -> Engine:
        """Load a model directory with mlx-lm, reporting progress as (fraction, phase).

        `prepare` sees the model before its weights are read (see ModelHook).
        """

        def progress(fraction: float, phase: str) -> None:
            if on_progress is not None:
                on_progress(fraction, phase)

        progress(0.0, "config")
        # lazy=True reads config, tokenizer and the weight index but not the weights,
        # so that materialising them below can be reported piece by piece.
        model, tokenizer, config = load_lazily(model_path)
        if prepare is not None:
            progress(0.05, "sharding")
            model = prepare(model, config)
        progress(0.1, "weights")
        params = [p for _, p in tree_flatten(model.parameters())]
        chunk = max(1, math.ceil(len(params) / 8))
        for start in range(0, len(params), chunk):
            mx.eval(params[start : start + chunk])
            done = min(len(params), start + chunk) / max(1, len(params))
            progress(0.1 + 0.8 * done, "weights")
        progress(0.9, "warmup")
        # A tiny forward pass, twice: the first pays one-off setup costs (kernel
        # selection, allocator growth) that would otherwise land on the first
        # request; the second is timed, the first estimate of a decode step. Its
        # cache tells what a token costs the prefix cache.
        warm = make_prompt_cache(model)
        mx.eval(model(mx.array([[0]]), cache=warm))
        started = time.perf_counter()
        mx.eval(model(mx.array([[0]]), cache=warm))
        step_seconds = time.perf_counter() - started
        bytes_per_token = (
            prefix_cache.kv_bytes_per_token(warm) if prefix_cache.supported(warm) is None else 0
        )
        engine = cls(
            model,
            tokenizer,
            model_id=model_id,
            context_length=_config_int(config, "max_position_embeddings") or DEFAULT_CONTEXT_LENGTH,
            vocab_size=_config_int(config, "vocab_size") or len(tokenizer),
            max_batch=max_batch,
            recover_step_errors=recover_step_errors,
            adaptive_pipelining=adaptive_pipelining,
            prompt_cache_bytes=prompt_cache_bytes,
            kv_bytes_per_token=bytes_per_token,
            step_seconds=step_seconds,
        )
        # The grammar engine's view of the vocabulary, built now rather than on the
        # first constrained request (about a second per 30k tokens).
        try:
            engine.grammar_tokenizer.get()
        except ValueError as exc:
            log.warning("%s; constrained requests will be refused", exc)
        progress(1.0, "ready")
        return engine

    def _new_generator(self) -> BatchGenerator:
        # Every sequence is inserted already prefilled (a filled cache and a
        # one-token prompt), so the generator's own prefill batching is unused.
        return BatchGenerator(
            self.model,
            sampler=greedy_sampler,
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,
            prefill_step_size=self.prefill_step_size,
        )

    # -- introspection ------------------------------------------------------------

    @property
    def active(self) -> frozenset[str]:
        """Request ids in flight: waiting to start, or decoding."""
        return frozenset(self._requests)

    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    @property
    def running(self) -> int:
        """Requests started and decoding (the others in `active` wait for a slot)."""
        return len(self._by_uid) + (self._solo is not None)

    @property
    def stream(self) -> mx.Stream:
        """The stream the generator's work runs on. Collectives issued between steps
        must use it too, so they run after the step's asynchronous work, in order."""
        return self._generator.stream

    def wait_queued(self) -> None:
        """Block until the work a step queued asynchronously (the next forward pass,
        which `step()` starts before it returns) has run."""
        mx.synchronize(self._generator.stream)

    @property
    def steps(self) -> int:
        """How many `step()` calls did work."""
        return self._steps

    @property
    def prompt_cache(self) -> PrefixCache:
        return self._prefix

    def prompt_cache_stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            lookups=self._lookups,
            hits=self._hits,
            tokens_reused=self._tokens_reused,
            entries=len(self._prefix),
            bytes=self._prefix.bytes_held,
            capacity_bytes=self._prefix.capacity_bytes,
            evictions=self._prefix.evictions,
        )

    # -- commands -----------------------------------------------------------------

    def submit(self, cmd: TextGeneration) -> list[GenerationEvent]:
        """Queue a request. Returns [] or, if it is refused, one GenerationFailed."""
        problem = self._validate(cmd)
        if problem is not None:
            return [GenerationFailed(request_id=cmd.request_id, kind="invalid", message=problem)]
        params = cmd.params
        try:
            sampling = request_sampling(
                params,
                vocab_size=self.vocab_size,
                eos_ids=self.eos_token_ids,
                grammar_tokenizer=self.grammar_tokenizer,
            )
        except ValueError as exc:
            return [GenerationFailed(request_id=cmd.request_id, kind="invalid", message=str(exc))]
        request = _Request(
            request_id=cmd.request_id,
            prompt=list(cmd.prompt_tokens),
            max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos,
            sampler=sampling.sampler,
            processors=sampling.processors,
            # The wrapper's `detokenizer` property returns a fresh copy per access,
            # so each request streams through its own detokenizer state.
            detokenizer=self.tokenizer.detokenizer,
            stops=StopStringMatcher(params.stop),
            guide=sampling.guide,
            logprobs=sampling.logprobs,
        )
        self._requests[cmd.request_id] = request
        self._pending.append(request)
        return []

    def _validate(self, cmd: TextGeneration) -> str | None:
        params = cmd.params
        if cmd.request_id in self._requests:
            return f"request id {cmd.request_id!r} is already in flight"
        if not cmd.prompt_tokens:
            return "empty prompt"
        if params.max_tokens < 1:
            return f"max_tokens must be >= 1, got {params.max_tokens}"
        if len(cmd.prompt_tokens) + params.max_tokens > self.context_length:
            return (
                f"prompt ({len(cmd.prompt_tokens)} tokens) + max_tokens ({params.max_tokens})"
                f" exceeds the context length {self.context_length}"
            )
        bad = [t for t in cmd.prompt_tokens if not 0 <= t < self.vocab_size]
        if bad:
            return f"token ids out of range [0, {self.vocab_size}): {bad[:5]}"
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            return f"temperature must be a finite number >= 0, got {params.temperature}"
        if not (0 < params.top_p <= 1):
            return f"top_p must be in (0, 1], got {params.top_p}"
        bad_bias = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad_bias:
            return f"logit_bias token ids out of range [0, {self.vocab_size}): {bad_bias[:5]}"
        if any(math.isnan(v) for v in params.logit_bias.values()):
            return "logit_bias values must not be NaN"
        if not 0 <= params.min_p <= 1:
            return f"min_p must be in [0, 1], got {params.min_p}"
        penalties = (params.presence_penalty, params.frequency_penalty, params.repeat_penalty)
        if not all(math.isfinite(v) for v in penalties) or params.repeat_penalty < 0:
            return "penalties must be finite numbers (repeat_penalty >= 0)"
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            return f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.logprobs}"
        thinking = params.thinking
        if thinking is not None and not (
            0 <= thinking.start < self.vocab_size and 0 <= thinking.end < self.vocab_size
        ):
            return "thinking marker ids out of range"
        return None

    def cancel(self, request_id: str) -> bool:
        """Drop a request so it never runs another step; no events follow for it.
        What it computed so far goes into the prefix cache (a client that retries,
        or continues from the same prompt, reuses it).

        Returns whether it was in flight (False if unknown or already finished).
        """
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if self._solo is not None and self._solo[0] is request:
            decoder = self._solo[1]
            self._solo = None
            self._keep(decoder.cached, decoder.cache)
        elif request.uid is None:
            self._pending.remove(request)
        else:
            del self._by_uid[request.uid]
            self._remove_from_generator(request.uid)
        return True

    def fail_all(self, kind: FailureKind, message: str) -> list[GenerationEvent]:
        """End every in-flight request with GenerationFailed (shutdown, fatal error)."""
        events: list[GenerationEvent] = [
            GenerationFailed(request_id=rid, kind=kind, message=message) for rid in self._requests
        ]
        uids = list(self._by_uid)
        self._requests.clear()
        self._by_uid.clear()
        self._pending.clear()
        self._solo = None
        if uids:
            try:
                self._generator.remove(uids)
            except Exception:  # the generator may be the thing that broke
                log.exception("removing failed requests from the generator")
                self._generator = self._new_generator()
        return events

    def resize_prompt_cache(self, capacity_tokens: int) -> None:
        """Hold at most this many tokens (the ranks of a split model agree on one
        capacity, see prefix_cache.py)."""
        self._prefix.resize(capacity_tokens)

    # -- decoding -----------------------------------------------------------------

    def step(self) -> list[GenerationEvent]:
        """One unit of work: start the requests waiting (as many as there is room
        for), or decode one token of the lone request, or run one
        BatchGenerator.next(); the tokens become events."""
        if not self._requests:
            return []
        self._steps += 1
        events: list[GenerationEvent] = []
        started = time.perf_counter()
        try:
            if self._pending and self.running < self.max_batch:
                return self._start_pending()
            if self._solo is not None:
                events = self._solo_step(*self._solo)
            else:
                events = self._batch_step()
            elapsed = time.perf_counter() - started
            self.step_seconds += _STEP_EMA * (elapsed - self.step_seconds)
        except Exception as exc:
            if not self.recover_step_errors:
                raise
            # Whatever broke (an MLX error, an allocation failure), the batch state
            # can no longer be trusted: fail everything in flight explicitly and
            # start over with a fresh generator rather than crash the runner.
            # Events already produced in this step stay valid and are kept.
            log.exception("generation step failed")
            broken = self._generator
            self._generator = self._new_generator()
            events.extend(self.fail_all("internal", f"generation step failed: {exc!r}"))
            try:
                broken.close()
            except Exception:
                log.debug("closing the broken generator failed", exc_info=True)
        return events

    def _batch_step(self) -> list[GenerationEvent]:
        events: list[GenerationEvent] = []
        _, responses = self._generator.next()
        for response in responses:
            request = self._by_uid.get(response.uid)
            if request is None:  # not expected: cancel() removes synchronously
                log.warning("token for unknown generator uid %d", response.uid)
                continue
            events.extend(
                self._on_token(request, response.token, response.finish_reason, response.logprobs)
            )
            # Ended at its length or EOS: the generator dropped it and hands over its
            # KV. (Ended early, by a stop string or its grammar, _on_token took it
            # out and kept its KV.)
            if request.request_id not in self._requests and response.finish_reason is not None:
                self._keep(response.all_tokens, response.prompt_cache)
        return events

    # -- starting requests -------------------------------------------------------

    def _start_pending(self) -> list[GenerationEvent]:
        """Start the waiting requests the batch has room for, in arrival order; each
        gets its first token in this step."""
        events: list[GenerationEvent] = []
        if self._solo is not None:
            events.extend(self._end_solo())
        room = self.max_batch - self.running
        starting, self._pending = self._pending[:room], self._pending[room:]
        hits = [self._lookup(request) for request in starting]
        if len(starting) == 1 and not self._by_uid:
            return events + self._start_alone(starting[0], hits[0])
        rows = [
            Row(
                prompt=request.prompt,
                cached=hit.tokens if hit else 0,
                cache=hit.layers() if hit else make_prompt_cache(self.model),
                sampler=request.sampler,
                processors=request.processors,
            )
            for request, hit in zip(starting, hits, strict=True)
        ]
        for group in prefill_groups([len(r.prompt) - r.cached for r in rows]):
            requests = [starting[i] for i in group]
            events.extend(self._start_together(requests, [rows[i] for i in group]))
        return events

    def _lookup(self, request: _Request) -> Hit | None:
        if self._prefix.capacity_tokens == 0:
            return None
        self._lookups += 1
        return self._prefix.lookup(request.prompt)

    def _count_reuse(self, request: _Request, cached: int) -> None:
        request.cached = cached
        if cached:
            self._hits += 1
            self._tokens_reused += cached

    def _start_together(self, requests: list[_Request], rows: list[Row]) -> list[GenerationEvent]:
        """Prefill these requests in one padded pass (prefill.py), emit their first
        tokens, and hand them to the generator with their filled caches."""
        try:
            prefill_rows(
                self.model,
                rows,
                prefill_step_size=self.prefill_step_size,
                vocab_size=self.vocab_size,
                stream=self._generator.stream,
            )
        except Exception as exc:
            return self._prefill_failed(requests, exc)
        events: list[GenerationEvent] = []
        for request, row in zip(requests, rows, strict=True):
            self._count_reuse(request, row.cached)
            token = row.first_token
            reason = self._finish_reason(request, token)
            events.extend(self._on_token(request, token, reason, row.logprobs))
            if request.request_id in self._requests:
                self._insert_started(request, row.cache, request.prompt, token)
            else:
                self._keep(request.prompt, row.cache)
        return events

    def _start_alone(self, request: _Request, hit: Hit | None) -> list[GenerationEvent]:
        """Prefill the prompt the way mlx-lm does (greedy output is stream_generate's
        token for token), emit the first token, and decode on alone (solo.py)."""
        decoder = SoloDecoder(
            self.model,
            request.sampler,
            request.processors,
            prefill_step_size=self.prefill_step_size,
            stream=self._generator.stream,
            adaptive=self.adaptive_pipelining,
            cache=hit.layers() if hit else None,
        )
        cached = hit.tokens if hit else 0
        try:
            token = decoder.prefill(request.prompt, cached)
        except Exception as exc:
            return self._prefill_failed([request], exc)
        self._count_reuse(request, cached)
        events = self._on_token(
            request, token, self._finish_reason(request, token), decoder.logprobs
        )
        if request.request_id in self._requests:  # still going
            decoder.queue(token)
            self._solo = (request, decoder)
        else:
            self._keep(decoder.cached, decoder.cache)
        return events

    def _prefill_failed(self, requests: list[_Request], exc: Exception) -> list[GenerationEvent]:
        """A prefill touches nothing shared (its caches are its own): only its
        requests fail; the others decode on."""
        if not self.recover_step_errors:
            raise exc
        log.exception("prefill of %s failed", [r.request_id for r in requests])
        message = f"prefill failed: {exc!r}"
        for request in requests:
            del self._requests[request.request_id]
        return [
            GenerationFailed(request_id=r.request_id, kind="internal", message=message)
            for r in requests
        ]

    def _stops_for(self, request: _Request) -> StopSequences:
        return self._no_stops if request.ignore_eos else self._eos_stops

    def _finish_reason(self, request: _Request, token: int) -> str | None:
        """Why `token`, about to be request's next, ends it (BatchGenerator's rules
        for the requests it does not decode itself)."""
        if not request.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if request.seq + 1 >= request.max_tokens:
            return "length"
        return None

    def _solo_step(self, request: _Request, decoder: SoloDecoder) -> list[GenerationEvent]:
        last = request.seq + 1 >= request.max_tokens
        token = decoder.advance(queue_next=not last)
        events = self._on_token(
            request, token, self._finish_reason(request, token), decoder.logprobs
        )
        if request.request_id not in self._requests:
            self._solo = None
            self._keep(decoder.cached, decoder.cache)
        return events

    def _end_solo(self) -> list[GenerationEvent]:
        """Hand the lone request to BatchGenerator (another one arrived): its token
        in flight, if one is, is emitted now, and the batch continues from there."""
        assert self._solo is not None
        request, decoder = self._solo
        self._solo = None
        token = decoder.take_input()
        if token is not None:  # not pipelining: nothing in flight, nothing to emit
            self._insert_started(request, decoder.cache, decoder.cached, token)
            return []
        token = decoder.advance(queue_next=False)
        events = self._on_token(
            request, token, self._finish_reason(request, token), decoder.logprobs
        )
        if request.request_id in self._requests:
            self._insert_started(request, decoder.cache, decoder.cached, token)
        else:
            self._keep(decoder.cached, decoder.cache)
        return events

    def _insert_started(
        self, request: _Request, cache: list[Any], tokens: list[int], token: int
    ) -> None:
        """Into the batch with its filled cache (holding `tokens`); `token` (emitted,
        not yet in the cache) is its next input."""
        (uid,) = self._generator.insert(
            [[token]],
            max_tokens=[request.max_tokens - request.seq],
            caches=[cache],
            all_tokens=[list(tokens)],
            samplers=[request.sampler],
            logits_processors=[request.processors],
            stop_sequences=[self._stops_for(request)],
        )
        request.uid = uid
        self._by_uid[uid] = request

    # -- ending requests ------------------------------------------------------------

    def _remove_from_generator(self, uid: int) -> None:
        """Take a sequence out of the batch, keeping its KV in the prefix cache."""
        keep = self._prefix.capacity_tokens > 0
        removed = self._generator.remove([uid], return_prompt_caches=keep)
        if keep and uid in removed:
            cache, tokens = removed[uid]
            self._keep(tokens, cache)

    def _keep(self, tokens: list[int], cache: list[KVCache]) -> None:
        """A request's KV, as it ended, into the prefix cache."""
        if self._prefix.capacity_tokens > 0 and tokens:
            self._prefix.store(tokens, cache)

    def _on_token(
        self,
        request: _Request,
        token: int,
        finish_reason: str | None,
        logprobs: mx.array | None = None,
    ) -> list[GenerationEvent]:
        """The events of a request's next token. A request this ends early (a stop
        string, its grammar) is taken out of the batch here, its KV kept; the
        caller does that for the lone decoder and the one just started."""
        if finish_reason == "stop":
            # The token is an EOS id (the only stop sequences we install): it ends
            # the request but is neither emitted nor counted.
            return [self._finish(request, "stop")]
        verdict = Verdict.CONTINUE
        if request.guide is not None:
            verdict = request.guide.accept(request.seq, token)
            if verdict is not Verdict.CONTINUE and finish_reason is None:
                self._drop_from_batch(request)  # it ends here, not at its length
            if verdict is Verdict.EOS:  # the grammar's end (EOS under ignore_eos)
                return [self._finish(request, "stop")]
            if verdict is Verdict.REJECTED:
                self._forget(request)
                message = f"constrained decoding failed: {request.guide.error}"
                failed = GenerationFailed(
                    request_id=request.request_id, kind="internal", message=message
                )
                return [failed]
        request.detokenizer.add_token(token)
        text, stopped = request.stops.push(request.detokenizer.last_segment)
        chosen, top = None, []
        if request.logprobs is not None and logprobs is not None:
            chosen, top = token_logprobs(logprobs, token, request.logprobs, self.token_bytes)
        events: list[GenerationEvent] = [
            ChunkGenerated(
                request_id=request.request_id,
                seq=request.seq,
                token=token,
                text=text,
                logprob=chosen,
                top_logprobs=top,
            )
        ]
        request.seq += 1
        if verdict is Verdict.DONE and not stopped:
            events.append(self._finish(request, "stop"))
            return events
        if stopped:
            # A stop string completed: end now. Unless this was also the request's
            # last token (then next() already dropped it), take it out of the batch.
            if finish_reason is None and verdict is Verdict.CONTINUE:
                self._drop_from_batch(request)
            events.append(self._finished_event(request, "stop", ""))
            self._forget(request)
        elif finish_reason == "length":
            events.append(self._finish(request, "length"))
        return events

    def _drop_from_batch(self, request: _Request) -> None:
        """Take a request that ends early out of the generator (if it is there:
        a lone or just-started request is not), keeping its KV."""
        if request.uid is not None and request.uid in self._by_uid:
            self._remove_from_generator(request.uid)

    def _finish(self, request: _Request, reason: FinishReason) -> GenerationFinished:
        """Terminal event for a request the generator has already dropped."""
        request.detokenizer.finalize()
        # The detokenizer's tail (e.g. a held-back space) may still complete a stop
        # string; otherwise whatever the matcher held back is released.
        tail, stopped = request.stops.push(request.detokenizer.last_segment)
        if stopped:
            reason = "stop"
        else:
            tail += request.stops.flush()
        self._forget(request)
        return self._finished_event(request, reason, tail)

    def _finished_event(
        self, request: _Request, reason: FinishReason, text: str
    ) -> GenerationFinished:
        return GenerationFinished(
            request_id=request.request_id,
            chunks=request.seq,
            finish_reason=reason,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.seq,
            text=text,
            stop_sequence=request.stops.matched if reason == "stop" else None,
            cached_tokens=request.cached,
        )

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        if request.uid is not None:
            self._by_uid.pop(request.uid, None)


def _config_int(config: dict[str, Any], key: str) -> int | None:
    """A positive int from a HF config, also looking inside a nested text_config."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get(key)
    return value if isinstance(value, int) and value > 0 else None
