"""Starting a real `exo-trio node` process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NodeProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> tuple[int, dict[str, object]]:
        response = httpx.get(f"{self.base_url}/health", timeout=5)
        return response.status_code, response.json()

    def wait_healthy(self, timeout: float = 90.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited early:\n{self.log()}")
            try:
                status, body = self.health()
                if status == 200:
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"node not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_node(
    model_dir: Path | str | None, data_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> NodeProcess:
    port = free_port()
    log_path = data_dir / f"node-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "exo_trio.cli", "node", "--api-port", str(port)]
    args += ["--data-dir", str(data_dir)]
    if model_dir is not None:
        args += ["--model", str(model_dir)]
    if "--listen" not in extra:
        # Nodes in tests never collide on the default link port.
        args += ["--listen", "127.0.0.1:0"]
    args += list(extra)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return NodeProcess(process, port, log_path)


@contextmanager
def serving(model_dir: Path | None, data_dir: Path, *extra: str) -> Iterator[NodeProcess]:
    """A healthy node for the duration of the block (for module-scoped fixtures)."""
    proc = start_node(model_dir, data_dir, *extra)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()
