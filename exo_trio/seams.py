"""The effects production code takes from outside, so the simulator can replace them.

- wall_clock: wall-clock seconds for values that go on the wire (OpenAI `created`).
  Logic reads only `trio.current_time()`.
- new_id: ids for requests and responses (uuid4 in production, seeded in the sim).
- faults: named fault points where real latency lives, and where error paths can
  be forced. No-ops in production; the simulator injects seeded delays and errors
  there, which is what opens the windows in which races like exo's
  register-after-dispatch bug live, and reaches error branches no healthy run takes.
- observer: what the node publishes about itself as it runs (observer.py). A
  no-op in production; the simulator and tests watch the node through it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from exo_trio.observer import Observer


class FaultPoints:
    """Production fault points: every hook returns at once, and no error path is
    forced.

    - `hit`: where latency lives; the simulator may delay or reschedule there.
    - `fire`: an error path the simulator may force, in the spirit of
      FoundationDB's BUGGIFY (the code takes its own error branch when it returns
      True), or a moment at which the simulator breaks something (a link cut right
      after a message went out). Synchronous; never True in production.
    """

    async def hit(self, name: str, request_id: str | None = None) -> None:
        return None

    def fire(self, name: str, *context: object) -> bool:
        """`context`: what the simulator may want to know (a request id, a peer)."""
        return False


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Seams:
    wall_clock: Callable[[], float] = time.time
    new_id: Callable[[str], str] = random_id
    faults: FaultPoints = field(default_factory=FaultPoints)
    observer: Observer = field(default_factory=Observer)
