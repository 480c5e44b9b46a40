"""Reading a node process from outside: /metrics, /health, RSS and open files.

The load harness decides "nothing leaked" from these: in-flight and open-stream
gauges and the runner's active requests back to zero, the process's resident
memory back to its baseline, and its open file descriptors (connections) too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import httpx


def metrics(base_url: str) -> dict[str, float]:
    """Prometheus text, flattened: `name{labels}` -> value."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def health(base_url: str) -> tuple[int, dict[str, object]]:
    response = httpx.get(f"{base_url}/health", timeout=10)
    return response.status_code, response.json()


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Leftovers:
    in_flight: float
    open_streams: float
    runner_active: float

    @property
    def clean(self) -> bool:
        return self.in_flight == 0 and self.open_streams == 0 and self.runner_active == 0


def leftovers(base_url: str) -> Leftovers:
    m = metrics(base_url)
    return Leftovers(
        m.get("exo_trio_requests_in_flight", 0.0),
        m.get("exo_trio_open_streams", 0.0),
        m.get("exo_trio_runner_active_requests", 0.0),
    )


def wait_quiet(base_url: str, limit: float = 30.0) -> tuple[float, Leftovers]:
    """Seconds until nothing is in flight (or `limit`), and what was left."""
    started = time.monotonic()
    while True:
        left = leftovers(base_url)
        if left.clean or time.monotonic() - started > limit:
            return time.monotonic() - started, left
        time.sleep(0.05)
