"""Keeping the ranks of a sharded runner in lockstep, one step at a time.

Every rank runs its own BatchGenerator over its share of the model, and every
forward pass is a collective: if two ranks ever disagreed on which sequences are
in the batch, their collectives would mismatch and the group would hang or
compute garbage. So before every step rank 0 (the coordinator, the only rank that
receives commands) tells every rank which commands to apply at that step, and
whether to stop; all ranks then apply the same commands in the same order and
run the same step.

One exchange is:

1. an `all_gather` of a 4-word int32 header from every rank: rank 0's says
   (stop, payload length); every rank's carries a digest of the generation
   events its previous step produced and its exchange counter. Equal digests
   prove the ranks sampled the same tokens; a difference (e.g. ranks on
   different hardware computing slightly different logits) is reported as an
   error rather than left to wedge the group later. Equal counters prove the
   header really came from live peers: a collective that was queued
   asynchronously (the previous step's forward pass) and lost its peer does not
   raise, it leaves garbage behind, and a later collective may return garbage
   too. So a header that does not check out means the group is broken, and the
   tokens of the step after it (computed from that garbage) are never emitted.
2. only when the payload is non-empty, an `all_sum` of a uint8 buffer holding the
   msgpack-encoded commands (the other ranks contribute zeros).

Both collectives run on the generator's stream, behind the asynchronous work the
previous step queued (which contains collectives of its own), so every rank
issues its collectives in the same order.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import msgspec
import numpy as np

from exo_trio.types import Cancel, GenerationEvent, TextGeneration

__all__ = ["Orders", "StepCommand", "StepSync", "StepSyncError", "events_digest"]

StepCommand = TextGeneration | Cancel

_HEADER_WORDS = 4  # stop flag, payload length, events digest, exchange counter
_DIGEST_MASK = 0x7FFFFFFF  # keep the digest a non-negative int32


class StepSyncError(RuntimeError):
    """The ranks disagree (different tokens) or a peer's header is unreadable
    (it was lost): the group can no longer be trusted."""


@dataclass(frozen=True)
class Orders:
    """What every rank does at this step."""

    stop: bool
    commands: list[StepCommand]


def events_digest(events: Sequence[GenerationEvent]) -> int:
    """A digest of one step's generation events, equal on ranks that agree."""
    if not events:
        return 0
    return zlib.crc32(_ENCODER.encode(list(events))) & _DIGEST_MASK


_ENCODER = msgspec.msgpack.Encoder()


class StepSync:
    """The per-step exchange. Rank 0 leads; every rank calls `exchange` once per step."""

    def __init__(self, group: mx.distributed.Group) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self._decoder = msgspec.msgpack.Decoder(list[StepCommand])
        # For reporting the cost of keeping the ranks in step.
        self.exchanges = 0
        self.payload_exchanges = 0
        self.seconds = 0.0

    def exchange(
        self,
        stream: mx.Stream,
        digest: int,
        *,
        stop: bool = False,
        commands: Sequence[StepCommand] = (),
    ) -> Orders:
        """Agree on this step's orders. `stop` and `commands` count on rank 0 only.

        Raises RuntimeError if a peer is lost, StepSyncError if a header does not
        check out (a peer lost, or ranks that produced different tokens).
        """
        started = time.perf_counter()
        leading = self.rank == 0
        payload = _ENCODER.encode(list(commands)) if leading and commands else b""
        counter = self.exchanges % _DIGEST_MASK + 1  # never 0, which garbage often is
        header = mx.array(
            [int(stop) if leading else 0, len(payload), digest & _DIGEST_MASK, counter],
            dtype=mx.int32,
        )
        gathered = mx.distributed.all_gather(header, group=self.group, stream=stream)
        table = np.array(gathered).reshape(self.size, _HEADER_WORDS)
        counters = table[:, 3].tolist()
        if any(c != counter for c in counters):
            lost = [r for r, c in enumerate(counters) if c != counter]
            raise StepSyncError(
                f"lost contact with rank(s) {lost}: their step header is unreadable"
            )
        digests = table[:, 2].tolist()
        if len(set(digests)) != 1:
            raise StepSyncError(
                f"ranks of the instance produced different tokens (digests by rank: {digests})"
            )
        stop_flag, length = bool(table[0, 0]), int(table[0, 1])
        orders = Orders(stop=stop_flag, commands=list(commands) if leading else [])
        if length:
            self.payload_exchanges += 1
            if leading:
                buffer = mx.array(np.frombuffer(payload, dtype=np.uint8))
            else:
                buffer = mx.zeros((length,), dtype=mx.uint8)
            summed = mx.distributed.all_sum(buffer, group=self.group, stream=stream)
            data = np.array(summed).tobytes()
            if not leading:
                orders = Orders(stop=stop_flag, commands=self._decoder.decode(data))
        self.exchanges += 1
        self.seconds += time.perf_counter() - started
        return orders
