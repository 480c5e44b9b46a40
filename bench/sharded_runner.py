"""Sharded runners against one runner, on the same model, in one run.

    python -m bench.sharded_runner [--model DIR] [--tokens 256] [--repeats 3] [--streams 4]

Measures, one configuration at a time (never two at once, so they do not share
the cores), with runner processes spoken to over their pipes exactly as a worker
does:

1. one runner (world size 1);
2. two ranks, pipeline-split (even layer ranges), in one ring group over loopback;
3. two ranks, tensor-split;

each with one greedy stream (decode tokens/s, time to first token) and then
`--streams` concurrent streams (aggregate tokens/s), and prints the ratio of each
sharded figure to the single runner's. Then it measures the step exchange alone
(step_sync.py) between two processes with no model: an empty exchange (every
step pays this) and one carrying a TextGeneration of a 1000-token prompt.

On loopback both ranks share this machine's cores, so the sharded figures
include the two processes competing for them; across two machines each rank has
its own. Without --model the demo model is built into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from exo_trio.framing import FrameDecoder, encode_frame
from exo_trio.runner_protocol import Loading, Ready, RunnerToWorker, Shutdown, WorkerToRunner
from exo_trio.types import (
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = [2, 882, 198, 72, 89, 3, 198, 2, 125, 198]


class RunnerProcess:
    """A runner child process and a blocking frame reader on its stdout."""

    def __init__(self, model: Path, extra: list[str]) -> None:
        env = dict(os.environ, EXO_TRIO_RUNNER_LOG="WARNING")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exo_trio.runner",
                "--model",
                str(model),
                "--model-id",
                "m",
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
        )
        self._decoder = FrameDecoder(RunnerToWorker)  # type: ignore[arg-type]
        self._pending: list[RunnerToWorker] = []

    def send(self, command: WorkerToRunner) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_frame(command))
        self.proc.stdin.flush()

    def receive(self) -> RunnerToWorker:
        assert self.proc.stdout is not None
        while not self._pending:
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                raise EOFError("runner exited")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def wait_ready(self) -> None:
        while not isinstance(message := self.receive(), Ready):
            assert isinstance(message, Loading), message

    def stop(self) -> None:
        try:
            self.send(Shutdown())
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_hostfile(directory: Path, ranks: int) -> Path:
    sockets = [socket.socket() for _ in range(ranks)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    hosts = [[f"127.0.0.1:{s.getsockname()[1]}"] for s in sockets]
    for s in sockets:
        s.close()
    path = directory / f"hosts-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(hosts))
    return path


@contextmanager
def instance(model: Path, sharding: str | None, workdir: Path) -> Iterator[RunnerProcess]:
    """Rank 0 of an instance (world size 1 when sharding is None), ready to serve."""
    if sharding is None:
        ranks = [RunnerProcess(model, [])]
    else:
        hostfile = free_hostfile(workdir, 2)
        ranks = [
            RunnerProcess(
                model,
                [
                    *("--rank", str(r), "--world-size", "2", "--hostfile", str(hostfile)),
                    *("--sharding", sharding),
                ],
            )
            for r in range(2)
        ]
    try:
        for rank in ranks:
            rank.wait_ready()
        yield ranks[0]
    finally:
        ranks[0].stop()
        for rank in ranks[1:]:
            rank.stop()


def request(rid: str, tokens: int) -> TextGeneration:
    return TextGeneration(
        request_id=rid,
        model="m",
        prompt_tokens=PROMPT,
        params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
    )


@dataclass
class Run:
    ttft: float  # seconds from send to the first chunk (mean over streams)
    decode_tps: float  # per stream: tokens after the first / time after the first
    aggregate_tps: float  # all streams' tokens / wall time


def drive(runner: RunnerProcess, streams: int, tokens: int) -> Run:
    sent = time.perf_counter()
    for i in range(streams):
        runner.send(request(f"r{i}", tokens))
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    done = 0
    while done < streams:
        message = runner.receive()
        now = time.perf_counter()
        if isinstance(message, ChunkGenerated):
            first.setdefault(message.request_id, now)
            last[message.request_id] = now
        elif isinstance(message, GenerationFinished):
            done += 1
        elif isinstance(message, GenerationFailed):
            raise RuntimeError(f"request failed: {message}")
    wall = max(last.values()) - sent
    decode = [(tokens - 1) / (last[r] - first[r]) for r in first]
    return Run(
        ttft=statistics.mean(t - sent for t in first.values()),
        decode_tps=statistics.mean(decode),
        aggregate_tps=streams * tokens / wall,
    )


def best(runs: list[Run]) -> Run:
    """The best of the repeats: on a shared machine the slow ones measure the neighbours."""
    return Run(
        ttft=min(r.ttft for r in runs),
        decode_tps=max(r.decode_tps for r in runs),
        aggregate_tps=max(r.aggregate_tps for r in runs),
    )


def measure(model: Path, sharding: str | None, args: argparse.Namespace, workdir: Path) -> dict:
    with instance(model, sharding, workdir) as runner:
        drive(runner, 1, 16)  # warm up
        one = best([drive(runner, 1, args.tokens) for _ in range(args.repeats)])
        many = best([drive(runner, args.streams, args.tokens) for _ in range(args.repeats)])
    return {"one": one, "many": many}


# -- the exchange alone -----------------------------------------------------------------


def sync_worker(rank: int, hostfile: str, rounds: int) -> None:
    """Child process: `rounds` empty exchanges, then `rounds` carrying a request."""
    os.environ.update(MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
    import mlx.core as mx

    from exo_trio.step_sync import StepSync

    group = mx.distributed.init(backend="ring", strict=True)
    sync = StepSync(group)
    stream = mx.new_stream(mx.cpu)
    big = TextGeneration(
        request_id="x" * 36,
        model="m",
        prompt_tokens=list(range(1000, 2000)),
        params=SamplingParams(max_tokens=256, temperature=0.7, seed=12345),
    )
    results = {}
    for name, commands in (("empty", []), ("1000-token request", [big])):
        for _ in range(20):
            sync.exchange(stream, 0, commands=commands)
        started = time.perf_counter()
        for _ in range(rounds):
            orders = sync.exchange(stream, 0, commands=commands)
        results[name] = (time.perf_counter() - started) / rounds
        assert rank == 0 or orders.commands == commands
    if rank == 0:
        print(json.dumps(results), flush=True)


def measure_sync(workdir: Path, rounds: int) -> dict[str, float]:
    hostfile = free_hostfile(workdir, 2)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.sharded_runner",
                "--sync-worker",
                str(r),
                str(hostfile),
                "--sync-rounds",
                str(rounds),
            ],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
        )
        for r in range(2)
    ]
    out, _ = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=30)
    return json.loads(out)


# -- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--sync-rounds", type=int, default=500)
    parser.add_argument("--sync-worker", nargs=2, metavar=("RANK", "HOSTFILE"), help="internal")
    args = parser.parse_args()
    if args.sync_worker:
        sync_worker(int(args.sync_worker[0]), args.sync_worker[1], args.sync_rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            from exo_trio.demo_model import build_demo_model

            model = build_demo_model(workdir / "demo")
        results = {}
        for name, sharding in (
            ("1 rank", None),
            ("2 ranks pipeline", "pipeline"),
            ("2 ranks tensor", "tensor"),
        ):
            results[name] = measure(model, sharding, args, workdir)
            print(f"measured {name}", file=sys.stderr, flush=True)
        sync = measure_sync(workdir, args.sync_rounds)

    base = results["1 rank"]
    print(f"\nmodel {model}, {args.tokens} tokens per stream, best of {args.repeats}")
    print(
        f"{'':18} {'1 stream tok/s':>15} {'ratio':>6} {'TTFT ms':>8} "
        f"{f'{args.streams} streams tok/s':>16} {'ratio':>6}"
    )
    for name, r in results.items():
        one, many = r["one"], r["many"]
        print(
            f"{name:18} {one.decode_tps:15.1f} {one.decode_tps / base['one'].decode_tps:6.2f} "
            f"{one.ttft * 1000:8.1f} {many.aggregate_tps:16.1f} "
            f"{many.aggregate_tps / base['many'].aggregate_tps:6.2f}"
        )
    print("\nstep exchange between 2 ranks over loopback (no model):")
    for name, seconds in sync.items():
        print(f"  {name:20} {seconds * 1e6:8.0f} us per exchange")


if __name__ == "__main__":
    main()
