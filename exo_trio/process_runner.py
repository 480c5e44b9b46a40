"""Starting the real runner: a child process speaking the protocol on its pipes."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# After its stdin closes a runner fails its work and exits; give it this long
# before it is killed.
EXIT_GRACE = 3.0


@dataclass
class ProcessRunner:
    process: trio.Process
    stream: trio.abc.Stream
    pid: int | None

    async def aclose(self) -> None:
        # Closing stdin is the polite stop: the runner sees EOF and exits.
        with trio.move_on_after(EXIT_GRACE):
            try:
                await self.stream.aclose()
            except trio.BrokenResourceError:
                pass
            await self.process.wait()
            return
        log.warning("runner %s did not exit in %.0fs; killing it", self.pid, EXIT_GRACE)
        self.process.kill()
        await self.process.wait()


def process_launcher(model_path: Path, model_id: str, max_batch: int):  # type: ignore[no-untyped-def]
    """A Worker launcher that starts `python -m exo_trio.runner` for this model."""

    async def launch() -> ProcessRunner:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "exo_trio.runner",
                "--model",
                str(model_path),
                "--model-id",
                model_id,
                "--max-batch",
                str(max_batch),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        log.info("started runner pid %d", process.pid)
        stream = trio.StapledStream(process.stdin, process.stdout)
        return ProcessRunner(process=process, stream=stream, pid=process.pid)

    return launch
