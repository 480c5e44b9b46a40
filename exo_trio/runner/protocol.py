"""The framed protocol between a worker and its runner process.

The worker writes commands (TextGeneration, Cancel, Shutdown) and the runner
writes status messages and generation events, as length-prefixed msgpack frames
(see framing.py) over any byte stream: the runner's stdin/stdout pipes in
production, an in-memory stream to a fake runner in the simulator.
"""

from __future__ import annotations

import msgspec

from exo_trio.types import (
    Cancel,
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    TextGeneration,
)

# The bound of a runner's prefix cache unless told otherwise (the runner's and the
# node's --prompt-cache-bytes).
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    """Command: finish (fail) in-flight work and exit."""


class Loading(msgspec.Struct, frozen=True, kw_only=True, tag="loading"):
    """Runner status while the model loads: `fraction` in [0, 1] and a phase name."""

    fraction: float
    phase: str


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    """Runner status: the model is loaded and the runner takes requests."""

    model: str
    context_length: int
    max_batch: int
    pid: int
    # The BLAS library the runner's matrix products run on (blas.py), as loaded.
    blas: str = ""


class CancelAck(msgspec.Struct, frozen=True, kw_only=True, tag="cancel_ack"):
    """The runner dropped a request after a Cancel. `steps_after_cancel` is how many
    decode steps it still ran for the request after the Cancel arrived (0 or 1 is
    the contract); `known` is False when the request had already ended."""

    request_id: str
    steps_after_cancel: int
    known: bool


class PromptCacheStats(msgspec.Struct, frozen=True, kw_only=True, tag="prompt_cache"):
    """The runner's prefix cache (prefix_cache.py), sent whenever it changed: counts
    since the runner started, and what it holds now. On a model split across ranks
    every rank sends its own (the same entries, its own layers' bytes)."""

    lookups: int = 0  # requests started while the cache was on
    hits: int = 0  # of which started from cached tokens
    tokens_reused: int = 0  # prompt tokens not computed again
    entries: int = 0
    bytes: int = 0  # held now
    capacity_bytes: int = 0
    evictions: int = 0


class RunnerError(msgspec.Struct, frozen=True, kw_only=True, tag="runner_error"):
    """The runner cannot continue (e.g. the model failed to load). `permanent`: the
    same start would fail the same way (an unsupported architecture, missing or
    malformed files, a bad setting), so the worker does not restart it."""

    message: str
    permanent: bool = False


WorkerToRunner = TextGeneration | Cancel | Shutdown
RunnerToWorker = (
    Loading
    | Ready
    | ChunkGenerated
    | GenerationFinished
    | GenerationFailed
    | CancelAck
    | PromptCacheStats
    | RunnerError
)
