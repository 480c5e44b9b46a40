"""The servers a comparison runs side by side: exo-trio nodes and mlx_lm.server,
started by the benchmark on the same model directory, and what each costs in CPU.

All of them are started once and stay up for the whole run; an idle one costs
nothing measurable (the node sleeps in its event loop, mlx_lm.server polls its
queue ten times a second), so a measurement of one is not disturbed by the others
being up, and each is warmed up the same way before the first measurement.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.nodeproc import NodeProcess, free_port, start_node

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    base_url: str
    pid: int
    stop: Callable[[], object]
    # Model id to send in requests.
    model: str
    info: dict[str, object] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server's process tree so far."""
        return tree_cpu_seconds(self.pid)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (Linux /proc)."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                stack.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return total


def start_exo(model_dir: Path, work: Path, name: str, *extra: str) -> Server:
    node: NodeProcess = start_node(model_dir, work / name.replace(" ", "-"), *extra)
    node.wait_healthy(timeout=300)
    _, health = node.health()
    return Server(
        name=name,
        base_url=node.base_url,
        pid=node.process.pid,
        stop=node.stop,
        model=model_dir.name,
        info={"runner": health.get("runner")},
    )


def start_mlx_server(model_dir: Path, work: Path, *extra: str) -> Server:
    """`python -m mlx_lm.server` on the model directory, as its README starts it."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    log = (work / "mlx_lm.server.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "mlx_lm.server", "--model", str(model_dir)),
            *("--host", "127.0.0.1", "--port", str(port)),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited: see {work / 'mlx_lm.server.log'}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("mlx_lm.server did not come up")
        time.sleep(0.5)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

    # mlx_lm.server serves its --model as "default_model" (it loads it on first use).
    return Server("mlx_lm.server", base_url, process.pid, stop, model="default_model")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
