"""Runner processes for tests: `python -m exo_trio.runner` spoken to over its pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from exo_trio.runner.framing import encode_frame, read_frames
from exo_trio.runner.protocol import (
    Loading,
    PromptCacheStats,
    Ready,
    RunnerToWorker,
    WorkerToRunner,
)
from exo_trio.types import ChunkGenerated, GenerationFailed, GenerationFinished, is_terminal

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunnerHandle:
    proc: trio.Process
    stream: trio.StapledStream[trio.abc.SendStream, trio.abc.ReceiveStream]
    frames: AsyncIterator[RunnerToWorker]
    seen: list[RunnerToWorker] = field(default_factory=list)
    # The runner's latest prefix cache report (receive() keeps them out of the way).
    cache_stats: PromptCacheStats | None = None

    async def send(self, command: WorkerToRunner) -> None:
        await self.stream.send_all(encode_frame(command))

    async def receive(self) -> RunnerToWorker:
        """The next message, prefix cache reports aside (see cache_stats)."""
        while True:
            message = await anext(self.frames)
            self.seen.append(message)
            if not isinstance(message, PromptCacheStats):
                return message
            self.cache_stats = message

    async def wait_ready(self) -> Ready:
        while True:
            message = await self.receive()
            if isinstance(message, Ready):
                return message
            assert isinstance(message, Loading), message

    async def until_terminal(self, request_id: str) -> list[RunnerToWorker]:
        """Everything received up to and including request_id's terminal event."""
        got: list[RunnerToWorker] = []
        while True:
            message = await self.receive()
            got.append(message)
            if (
                isinstance(message, ChunkGenerated | GenerationFinished | GenerationFailed)
                and message.request_id == request_id
                and is_terminal(message)
            ):
                return got


def runner_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["EXO_TRIO_RUNNER_LOG"] = "WARNING"
    env.update(overrides)
    return env


@asynccontextmanager
async def start_runner(
    model_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[RunnerHandle]:
    """`python -m exo_trio.runner` with its pipes; killed on the way out."""
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            *("-m", "exo_trio.runner", "--model", str(model_dir), "--model-id", "demo"),
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=runner_env(**(env or {})),
    )
    assert proc.stdin is not None and proc.stdout is not None
    stream = trio.StapledStream(proc.stdin, proc.stdout)
    frames = read_frames(proc.stdout, RunnerToWorker)  # type: ignore[arg-type]
    try:
        yield RunnerHandle(proc, stream, frames)
    finally:
        await frames.aclose()  # type: ignore[attr-defined]
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5):
            await proc.wait()
