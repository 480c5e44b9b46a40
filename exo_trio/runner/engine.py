"""The synchronous MLX generation core of a runner: continuous batching, no I/O.

`Engine` turns `TextGeneration` commands into `ChunkGenerated` /
`GenerationFinished` / `GenerationFailed` events. It wraps one shared mlx-lm
`BatchGenerator`: a request submitted while others decode joins the running batch
without waiting for the others to finish. The step after its arrival prefills
its prompt and emits its first token (the engine does that itself, with mlx-lm's
arithmetic, then hands the request and its filled KV cache to the generator);
a burst of arrivals is left to the generator's batched prefill instead. A
request alone on the runner is decoded outside the generator, like mlx-lm's
`generate_step`, until another one arrives (solo.py says why).

The engine does no I/O and never blocks on anything but MLX, so it can be unit
tested directly; the runner process (loop.py, rank.py) owns the pipes and calls
`submit` / `cancel` / `step` from one thread.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper

from exo_trio.runner.guide import Guide, Verdict
from exo_trio.runner.model_files import load_lazily
from exo_trio.runner.sampling import (
    MAX_TOP_LOGPROBS,
    GrammarTokenizer,
    TokenBytes,
    request_sampling,
    token_logprobs,
)
from exo_trio.runner.solo import SoloDecoder
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

__all__ = ["DEFAULT_CONTEXT_LENGTH", "Engine", "ModelHook", "ProgressCallback"]

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 4096
ProgressCallback = Callable[[float, str], None]
# Called on the lazily loaded model (and its config) before any weight is read;
# returns the model to serve. Sharding cuts the model down here (layer_split.py).
ModelHook = Callable[[Any, dict[str, Any]], Any]
Sampler = Callable[[mx.array], mx.array]

# How many new requests one step starts itself (Engine._can_start_directly).
DIRECT_START_MAX = 2


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
        # Submitted, not yet started: the next step starts them (see step()).
        self._pending: list[_Request] = []
        # A request decoding alone, outside the generator (solo.py).
        self._solo: tuple[_Request, SoloDecoder] | None = None
        self._steps = 0
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
        # One tiny forward pass: the first call pays one-off setup costs (kernel
        # selection, allocator growth) that would otherwise land on the first request.
        mx.eval(model(mx.array([[0]]), cache=make_prompt_cache(model)))
        engine = cls(
            model,
            tokenizer,
            model_id=model_id,
            context_length=_config_int(config, "max_position_embeddings") or DEFAULT_CONTEXT_LENGTH,
            vocab_size=_config_int(config, "vocab_size") or len(tokenizer),
            max_batch=max_batch,
            recover_step_errors=recover_step_errors,
            adaptive_pipelining=adaptive_pipelining,
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
        return BatchGenerator(
            self.model,
            sampler=greedy_sampler,
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(8, self.max_batch),
            prefill_step_size=self.prefill_step_size,
        )

    # -- introspection ------------------------------------------------------------

    @property
    def active(self) -> frozenset[str]:
        """Request ids in the generator: queued, prefilling or decoding."""
        return frozenset(self._requests)

    @property
    def has_work(self) -> bool:
        return bool(self._requests)

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
        """How many `step()` calls did work (one BatchGenerator.next() each)."""
        return self._steps

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

        Returns whether it was in flight (False if unknown or already finished).
        """
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if self._solo is not None and self._solo[0] is request:
            self._solo = None
        elif request.uid is None:
            self._pending.remove(request)
        else:
            del self._by_uid[request.uid]
            self._generator.remove([request.uid])
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

    # -- decoding -----------------------------------------------------------------

    def step(self) -> list[GenerationEvent]:
        """One unit of work: start the requests submitted since the last step, or
        decode one token of the lone request, or run one BatchGenerator.next();
        the tokens become events."""
        if not self._requests:
            return []
        self._steps += 1
        events: list[GenerationEvent] = []
        try:
            if self._pending:
                pending, self._pending = self._pending, []
                direct = self._can_start_directly(len(pending))
                if self._solo is not None:
                    events.extend(self._end_solo())
                if direct:
                    alone = not self._by_uid and len(pending) == 1
                    for request in pending:
                        events.extend(self._start_directly(request, alone))
                    return events
                self._insert(pending)
            if self._solo is not None:
                return events + self._solo_step(*self._solo)
            _, responses = self._generator.next()
            for response in responses:
                request = self._by_uid.get(response.uid)
                if request is None:  # not expected: cancel() removes synchronously
                    log.warning("token for unknown generator uid %d", response.uid)
                    continue
                events.extend(
                    self._on_token(
                        request, response.token, response.finish_reason, response.logprobs
                    )
                )
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

    # -- starting requests -------------------------------------------------------

    def _can_start_directly(self, count: int) -> bool:
        """Start a few new requests ourselves when the batch has room for them.

        Left to BatchGenerator, a new request's first token comes out of the third
        next() call (prefill, move into the decoding batch, return the token; see
        the module docstring), each of which also decodes the running batch: about
        six decode steps of latency for a joining request. Started directly, its
        prompt is prefilled and its first token sampled in one step, and emitted at
        the end of that step. A burst of arrivals goes to BatchGenerator instead,
        which prefills up to eight prompts in one batched pass; so does a request
        that would have to wait for a free slot anyway."""
        running = len(self._by_uid) + (self._solo is not None)
        return count <= DIRECT_START_MAX and running + count <= self.max_batch

    def _insert(self, requests: list[_Request]) -> None:
        uids = self._generator.insert(
            [r.prompt for r in requests],
            max_tokens=[r.max_tokens for r in requests],
            samplers=[r.sampler for r in requests],
            logits_processors=[r.processors for r in requests],
            stop_sequences=[self._stops_for(r) for r in requests],
        )
        for request, uid in zip(requests, uids, strict=True):
            request.uid = uid
            self._by_uid[uid] = request

    def _stops_for(self, request: _Request) -> StopSequences:
        return self._no_stops if request.ignore_eos else self._eos_stops

    def _start_directly(self, request: _Request, alone: bool) -> list[GenerationEvent]:
        """Prefill the prompt and emit the first token now; then decode the rest
        alone (a SoloDecoder, if nothing else runs) or in the batch."""
        decoder = SoloDecoder(
            self.model,
            request.sampler,
            request.processors,
            prefill_step_size=self.prefill_step_size,
            stream=self._generator.stream,
            adaptive=self.adaptive_pipelining,
        )
        # Alone, mlx-lm's own two-pass prefill: greedy output is stream_generate's
        # token for token. Joining others, one pass (a step sooner; see prefill).
        try:
            token = decoder.prefill(request.prompt, fused=not alone)
        except Exception as exc:
            if not self.recover_step_errors:
                raise
            # The prefill touched nothing shared (its cache is the decoder's own):
            # only this request fails; the others decode on.
            log.exception("prefill of %s failed", request.request_id)
            del self._requests[request.request_id]
            message = f"prefill failed: {exc!r}"
            return [
                GenerationFailed(request_id=request.request_id, kind="internal", message=message)
            ]
        events = self._on_token(
            request, token, self._finish_reason(request, token), decoder.logprobs
        )
        if request.request_id in self._requests:  # still going
            if alone:
                decoder.queue(token)
                self._solo = (request, decoder)
            else:
                self._insert_started(request, decoder, token)
        return events

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
        return events

    def _end_solo(self) -> list[GenerationEvent]:
        """Hand the lone request to BatchGenerator (another one arrived): its token
        in flight, if one is, is emitted now, and the batch continues from there."""
        assert self._solo is not None
        request, decoder = self._solo
        self._solo = None
        token = decoder.take_input()
        if token is not None:  # not pipelining: nothing in flight, nothing to emit
            self._insert_started(request, decoder, token)
            return []
        token = decoder.advance(queue_next=False)
        events = self._on_token(
            request, token, self._finish_reason(request, token), decoder.logprobs
        )
        if request.request_id in self._requests:
            self._insert_started(request, decoder, token)
        return events

    def _insert_started(self, request: _Request, decoder: SoloDecoder, token: int) -> None:
        """Into the batch with its filled cache; `token` (emitted, not yet in the
        cache) is its next input."""
        (uid,) = self._generator.insert(
            [[token]],
            max_tokens=[request.max_tokens - request.seq],
            caches=[decoder.cache],
            all_tokens=[list(decoder.cached)],
            samplers=[request.sampler],
            logits_processors=[request.processors],
            stop_sequences=[self._stops_for(request)],
        )
        request.uid = uid
        self._by_uid[uid] = request

    def _on_token(
        self,
        request: _Request,
        token: int,
        finish_reason: str | None,
        logprobs: mx.array | None = None,
    ) -> list[GenerationEvent]:
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
        a lone or just-started request is not)."""
        if request.uid is not None and request.uid in self._by_uid:
            self._generator.remove([request.uid])

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
