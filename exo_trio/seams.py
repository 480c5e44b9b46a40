"""The effects production code takes from outside, so the simulator can replace them.

- wall_clock: wall-clock seconds for values that go on the wire (OpenAI `created`).
  Logic reads only `trio.current_time()`.
- new_id: ids for requests and responses (uuid4 in production, seeded in the sim).
- faults: named fault points where real latency lives. No-ops in production; the
  simulator injects seeded delays and errors there, which is what opens the windows
  in which races like exo's register-after-dispatch bug live.
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
    """Production fault points: every hook returns at once."""

    async def hit(self, name: str, request_id: str | None = None) -> None:
        return None


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Seams:
    wall_clock: Callable[[], float] = time.time
    new_id: Callable[[str], str] = random_id
    faults: FaultPoints = field(default_factory=FaultPoints)
    observer: Observer = field(default_factory=Observer)
