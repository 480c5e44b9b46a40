"""Per-request time limits: time to first token, idle between tokens, total.

A request whose runner stops producing (wedged, a lost peer that nobody noticed,
a bug) must end with an explicit error in its dialect, never hang its client. The
limits are checked in one place, `generation.events`, which every dialect goes
through; this module only says which deadline comes next and what to tell the
client when it passes. Time is Trio's clock, so the simulator and tests can run
the limits under MockClock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from exo_trio.types import GenerationFailed

# Defaults, in seconds (0 = no limit). Queueing counts towards the first token: a
# request may wait behind a full batch (--max-queued of them) and then prefill a
# long prompt, so the first-token limit is generous. Between tokens there is only
# one decode step (plus, at worst, another request's prefill joining the batch).
DEFAULT_TTFT_TIMEOUT = 600.0
DEFAULT_IDLE_TIMEOUT = 120.0
DEFAULT_REQUEST_TIMEOUT = 3600.0


class Milestones(Protocol):
    """What the limits read from a request's timing (generation.Timing)."""

    started: float
    first_token: float | None
    last_token: float | None


@dataclass(frozen=True)
class Deadline:
    at: float
    kind: str  # "ttft", "idle" or "total"
    limit: float


@dataclass(frozen=True)
class RequestTimeouts:
    ttft: float = DEFAULT_TTFT_TIMEOUT
    idle: float = DEFAULT_IDLE_TIMEOUT
    total: float = DEFAULT_REQUEST_TIMEOUT

    @classmethod
    def off(cls) -> RequestTimeouts:
        return cls(0.0, 0.0, 0.0)

    def next_deadline(self, timing: Milestones) -> Deadline | None:
        """The earliest limit that applies now, or None when none does."""
        candidates: list[Deadline] = []
        if self.total > 0:
            candidates.append(Deadline(timing.started + self.total, "total", self.total))
        if timing.first_token is None:
            if self.ttft > 0:
                candidates.append(Deadline(timing.started + self.ttft, "ttft", self.ttft))
        elif self.idle > 0:
            last = timing.last_token if timing.last_token is not None else timing.first_token
            candidates.append(Deadline(last + self.idle, "idle", self.idle))
        return min(candidates, key=lambda d: d.at, default=None)


_WHAT = {
    "ttft": "no token was generated within {limit:g}s of the request (time-to-first-token limit)",
    "idle": "no token was generated for {limit:g}s (idle limit between tokens)",
    "total": "the request ran longer than {limit:g}s (total request limit)",
}


def timed_out(request_id: str, deadline: Deadline) -> GenerationFailed:
    """The terminal event a request gets when a limit passes. Made here, not by a
    runner: the runner's work is cancelled when the request's scope closes."""
    what = _WHAT[deadline.kind].format(limit=deadline.limit)
    return GenerationFailed(
        request_id=request_id, kind="timeout", message=f"Generation timed out: {what}."
    )
