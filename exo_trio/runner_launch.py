"""Starting the real runner: a child process speaking the protocol on its pipes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from exo_trio.affinity import CoreSplit, format_cores, runner_cores, usable_cores
from exo_trio.blas import BlasChoice, runner_env
from exo_trio.cluster_messages import InstanceSpec
from exo_trio.runner.protocol import DEFAULT_PROMPT_CACHE_BYTES

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


def process_launcher(
    model_path: Path,
    model_id: str,
    max_batch: int,
    extra_args: tuple[str, ...] = (),
    cpus: frozenset[int] | None = None,
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    blas: BlasChoice | None = None,
):  # type: ignore[no-untyped-def]
    """A Worker launcher that starts `python -m exo_trio.runner` for this model,
    pinned to `cpus` if given (exo_trio/affinity.py), with `blas` preloaded
    (exo_trio/blas.py)."""
    if cpus:
        extra_args = (*extra_args, "--cpus", format_cores(cpus))
    extra_args = (*extra_args, "--prompt-cache-bytes", str(prompt_cache_bytes))
    env = None
    if blas is not None and blas.path is not None:
        threads = len(cpus or usable_cores() or ()) or os.cpu_count() or 1
        env = {**os.environ, **runner_env(blas, threads)}

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
                *extra_args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert process.stdin is not None and process.stdout is not None
        log.info("started runner pid %d", process.pid)
        stream = trio.StapledStream(process.stdin, process.stdout)
        return ProcessRunner(process=process, stream=stream, pid=process.pid)

    return launch


def write_hostfile(directory: Path, spec: InstanceSpec) -> Path:
    """The mx.distributed ring hostfile: one [host:port] list per rank, rank order."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.instance_id}.hosts.json"
    hosts = [[f"{s.host}:{s.port}"] for s in spec.shards]
    path.write_text(json.dumps(hosts))
    return path


def shard_launcher_factory(
    model_dir: Callable[[InstanceSpec], Path],
    max_batch: int,
    run_dir: Path,
    cores: CoreSplit | None = None,
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    blas: BlasChoice | None = None,
) -> Callable[[InstanceSpec, int], Callable[[], Awaitable[ProcessRunner]]]:
    """Launchers for this node's rank of an instance (the ShardManager's factory);
    `model_dir` says where the instance's model is on this node (asked when the
    runner starts, after the shard got its files). With `cores` (the node pinned
    itself to cores.node), a one-rank instance's runner is pinned to
    cores.runners; the rank of a split model gets every core
    back (it would inherit the node's own), since nodes sharing a machine would
    otherwise stack their ranks on the same cores."""

    def launcher_for(spec: InstanceSpec, rank: int) -> Callable[[], Awaitable[ProcessRunner]]:
        shard = spec.shards[rank]
        extra: tuple[str, ...] = ()
        if spec.world_size > 1:
            hostfile = write_hostfile(run_dir, spec)
            extra = (
                "--rank",
                str(rank),
                "--world-size",
                str(spec.world_size),
                "--hostfile",
                str(hostfile),
                "--backend",
                spec.backend,
                "--sharding",
                spec.sharding,
                "--layers",
                f"{shard.start_layer}:{shard.end_layer}",
            )
        cpus = runner_cores(cores, spec.world_size)

        async def launch() -> ProcessRunner:
            start = process_launcher(
                model_dir(spec),
                spec.model,
                max_batch,
                extra,
                cpus,
                prompt_cache_bytes=prompt_cache_bytes,
                blas=blas,
            )
            return await start()

        return launch

    return launcher_for
