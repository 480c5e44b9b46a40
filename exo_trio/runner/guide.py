"""Constrained decoding for one request: a grammar's token mask, and thinking.

A `Guide` is a logits processor (mlx-lm's `(tokens, logits) -> logits`) that
masks every token the request may not produce next, and a state machine that
must see every generated token, in order:

* **The grammar** (llguidance: an `LLMatcher` per request over the runner's
  `LLTokenizer`, the grammar compiled by the node, see api/structured.py)
  allows only tokens that keep the output a prefix of its language: a JSON
  schema, a forced tool call in the model's own call format. When the grammar is
  complete it allows only EOS, or, once nothing can follow, the guide says the
  request is done.
* **Thinking**: a request of a model with thinking markers may think before its
  constrained output. Before the body starts, the thinking start token is
  allowed besides what the grammar allows; inside the thinking section the
  grammar is off (anything but EOS: a forced call must still come); its end
  token starts the grammar. A thinking budget (Anthropic's `budget_tokens`)
  forces the end token once the section has that many tokens.

The token order problem. BatchGenerator samples token k+1 before it hands token
k back (mlx-lm pipelines its steps), so the mask for token k+1 is computed
before the engine sees token k: the processor reads the tokens it has not seen
yet from its `tokens` argument (the request's context: the prompt, then every
generated token fed back so far). The engine also tells the guide each token as
it emits it (`accept`), because the lone-request decoder feeds a token back
only on the next step. Whichever comes first consumes the token; the other
finds it consumed. Either way the matcher advances exactly once per token, in
order. Reading tokens back synchronises with the step that sampled them: a
constrained request gives up mlx-lm's step pipelining, which costs nothing
measurable on a CPU (solo.py) and is the price of any token-level grammar.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

__all__ = ["Guide", "Thinking", "Verdict"]


class Verdict(enum.Enum):
    CONTINUE = "continue"  # the token is output; more may follow
    DONE = "done"  # the token is output and completes the grammar: end here
    EOS = "eos"  # the token is the grammar's end (an EOS id): not output, end here
    REJECTED = "rejected"  # the grammar refused the token (or failed): end with an error


@dataclass(frozen=True)
class Thinking:
    """The model's thinking markers (single token ids) as they apply to a request."""

    start: int
    end: int
    inside: bool  # the prompt opened the section: generation starts inside it
    budget: int | None = None  # at most this many tokens inside the section


class _Phase(enum.Enum):
    BEFORE = "before"  # nothing generated yet (or only the thinking section may start)
    THINKING = "thinking"
    BODY = "body"  # the grammar's output (or, without a grammar, free text)
    ENDED = "ended"


class Guide:
    """One request's constraint state; also its logits processor (`__call__`)."""

    def __init__(
        self,
        matcher: Any | None,
        *,
        vocab_size: int,
        eos_ids: frozenset[int],
        thinking: Thinking | None = None,
    ) -> None:
        self.matcher = matcher  # llguidance.LLMatcher, or None (only thinking rules)
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.thinking = thinking
        if thinking is not None and thinking.inside:
            self.phase = _Phase.THINKING
        elif thinking is not None:
            self.phase = _Phase.BEFORE
        else:
            self.phase = _Phase.BODY
        self.thought = 0  # tokens inside the thinking section so far
        self.error: str | None = None
        self._consumed = 0  # generated tokens consumed
        self._base: int | None = None  # context length at the first call (the prompt)
        self._last: Verdict = Verdict.CONTINUE  # the verdict on the last consumed token
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._no_eos: mx.array | None = None

    # -- the state machine ---------------------------------------------------------

    def accept(self, position: int, token: int) -> Verdict:
        """Generated token number `position` is `token`. Consumes it unless the
        processor already did; returns the verdict on it."""
        if position == self._consumed:
            self._last = self._consume(token)
            self._consumed += 1
        elif position != self._consumed - 1:
            raise AssertionError(f"guide fed token {position}, expected {self._consumed}")
        return self._last

    def _consume(self, token: int) -> Verdict:
        if self.phase is _Phase.ENDED:
            return Verdict.REJECTED
        thinking = self.thinking
        if thinking is not None and self.phase is not _Phase.BODY:
            if self.phase is _Phase.BEFORE and token != thinking.start:
                self.phase = _Phase.BODY  # no thinking: the body starts with this token
            elif self.phase is _Phase.BEFORE:
                self.phase = _Phase.THINKING
                return Verdict.CONTINUE
            elif token == thinking.end:
                self.phase = _Phase.BODY
                return Verdict.CONTINUE
            else:
                self.thought += 1
                return Verdict.CONTINUE
        matcher = self.matcher
        if matcher is None:
            return Verdict.CONTINUE
        if not matcher.consume_token(token):
            self.phase = _Phase.ENDED
            self.error = matcher.get_error() or f"token {token} does not fit the grammar"
            return Verdict.REJECTED
        if token in self.eos_ids:
            self.phase = _Phase.ENDED
            return Verdict.EOS
        if matcher.is_stopped():
            self.phase = _Phase.ENDED
            return Verdict.DONE
        return Verdict.CONTINUE

    # -- the logits processor ------------------------------------------------------

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._base is None:
            self._base = tokens.shape[0]
        unseen = self._base + self._consumed
        if tokens.shape[0] > unseen:
            for token in tokens[unseen:].tolist():
                self.accept(self._consumed, int(token))
        allowed = self._allowed()
        if allowed is None:
            return logits
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _allowed(self) -> mx.array | None:
        """Which tokens may come next (a bool mask over the vocabulary), or None
        for any."""
        thinking = self.thinking
        if self.phase is _Phase.ENDED:
            return None  # the engine ends the request before sampling again
        if self.phase is _Phase.THINKING:
            assert thinking is not None
            if thinking.budget is not None and self.thought >= thinking.budget:
                return self._only(thinking.end)
            return self._without_eos() if self.matcher is not None else None
        if self.matcher is None:
            return None
        mask = self._grammar_mask()
        if self.phase is _Phase.BEFORE:
            assert thinking is not None
            mask[thinking.start] = True
        return mx.array(mask)

    def _grammar_mask(self) -> np.ndarray:
        assert self.matcher is not None
        bitmask = self._bitmask
        self.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]
        return bits.astype(bool)

    def _without_eos(self) -> mx.array:
        if self._no_eos is None:
            mask = np.ones(self.vocab_size, dtype=bool)
            mask[[t for t in self.eos_ids if t < self.vocab_size]] = False
            self._no_eos = mx.array(mask)
        return self._no_eos

    def _only(self, token: int) -> mx.array:
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[token] = True
        return mx.array(mask)
