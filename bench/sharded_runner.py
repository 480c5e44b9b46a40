"""Sharded runners against one runner, on the same model, in one run.

    python -m bench.sharded_runner [--model DIR] [--tokens 256] [--repeats 3]
                                   [--streams 4] [--rounds 3]

Measures, one configuration at a time (never two at once, so they do not share
the cores), with runner processes spoken to over their pipes exactly as a worker
does:

1. one runner (world size 1);
2. two ranks, pipeline-split (even layer ranges), in one ring group over loopback;
3. two ranks, tensor-split;

each with one greedy stream (decode tokens/s, time to first token) and then
`--streams` concurrent streams (aggregate tokens/s); with the CPU time all of the
configuration's processes used per token generated (load on the machine slows a
configuration down but hardly changes this), and the CPU they use over
`--idle-seconds` while idle. Each round measures every configuration once, and
ratios are taken within a round: on a shared machine only figures measured close
together compare; the load average is printed alongside.

Then it measures the step exchange alone (step_sync.py's side channel) between
two processes with no model: an empty exchange (every step pays this) and one
carrying a TextGeneration of a 1000-token prompt.

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

from exo_trio.runner.framing import FrameDecoder, encode_frame
from exo_trio.runner.protocol import Loading, Ready, RunnerToWorker, Shutdown, WorkerToRunner
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
def instance(model: Path, sharding: str | None, workdir: Path) -> Iterator[list[RunnerProcess]]:
    """The ranks of an instance (one when sharding is None), ready to serve; rank 0
    first."""
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
        yield ranks
    finally:
        ranks[0].stop()
        for rank in ranks[1:]:
            rank.stop()


def cpu_seconds(ranks: list[RunnerProcess]) -> float:
    """User + system CPU time the ranks' processes have used so far (Linux /proc)."""
    total = 0.0
    for rank in ranks:
        with open(f"/proc/{rank.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    cpu_per_token: float  # CPU seconds of all ranks per token generated


def drive(ranks: list[RunnerProcess], streams: int, tokens: int) -> Run:
    runner = ranks[0]
    cpu = cpu_seconds(ranks)
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
        cpu_per_token=(cpu_seconds(ranks) - cpu) / (streams * tokens),
    )


def best(runs: list[Run]) -> Run:
    """The best of the repeats: on a shared machine the slow ones measure the neighbours."""
    return Run(
        ttft=min(r.ttft for r in runs),
        decode_tps=max(r.decode_tps for r in runs),
        aggregate_tps=max(r.aggregate_tps for r in runs),
        cpu_per_token=min(r.cpu_per_token for r in runs),
    )


@dataclass
class Measured:
    one: Run  # one stream
    many: Run  # --streams streams
    idle_cpu: float  # CPU seconds of all ranks over --idle-seconds idle


def measure(model: Path, sharding: str | None, args: argparse.Namespace, workdir: Path) -> Measured:
    with instance(model, sharding, workdir) as ranks:
        drive(ranks, 1, 16)  # warm up
        one = best([drive(ranks, 1, args.tokens) for _ in range(args.repeats)])
        many = best([drive(ranks, args.streams, args.tokens) for _ in range(args.repeats)])
        time.sleep(0.5)
        cpu = cpu_seconds(ranks)
        time.sleep(args.idle_seconds)
        idle = cpu_seconds(ranks) - cpu
    return Measured(one, many, idle)


# -- the exchange alone -----------------------------------------------------------------


def sync_worker(rank: int, hostfile: str, rounds: int) -> None:
    """Child process: `rounds` empty exchanges, then `rounds` carrying a request, over
    the side channel (rank 0's orders out, the other rank's report back)."""
    import mlx.core as mx

    from exo_trio.runner.layer_split import ShardSpec
    from exo_trio.runner.step_sync import LeaderChannel, open_channel

    os.environ.update(MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
    group = mx.distributed.init(backend="ring", strict=True)
    spec = ShardSpec(
        rank=rank,
        world_size=2,
        backend="ring",
        sharding="pipeline",
        layers=None,
        hostfile=Path(hostfile),
    )
    channel = open_channel(group, spec, timeout=30, stall_timeout=30)
    big = TextGeneration(
        request_id="x" * 36,
        model="m",
        prompt_tokens=list(range(1000, 2000)),
        params=SamplingParams(max_tokens=256, temperature=0.7, seed=12345),
    )
    results = {}
    for name, commands in (("empty", []), ("1000-token request", [big])):
        started = 0.0
        for i in range(20 + rounds):
            if i == 20:
                started = time.perf_counter()
            if isinstance(channel, LeaderChannel):
                channel.confirm(channel.send_orders(commands=commands), 0)
            else:
                orders = channel.receive(30)
                assert orders.commands == commands
                channel.report(orders.seq, 0, 30)
        results[name] = (time.perf_counter() - started) / rounds
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

CONFIGS = {"1 rank": None, "2 ranks pipeline": "pipeline", "2 ranks tensor": "tensor"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--sync-rounds", type=int, default=500)
    parser.add_argument("--sync-worker", nargs=2, metavar=("RANK", "HOSTFILE"), help="internal")
    args = parser.parse_args()
    if args.sync_worker:
        sync_worker(int(args.sync_worker[0]), args.sync_worker[1], args.sync_rounds)
        return
    load_before = os.getloadavg()
    rounds: list[dict[str, Measured]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            from exo_trio.demo_model import build_demo_model

            model = build_demo_model(workdir / "demo")
        for number in range(1, args.rounds + 1):
            rounds.append(
                {
                    name: measure(model, sharding, args, workdir)
                    for name, sharding in CONFIGS.items()
                }
            )
            print(
                f"measured round {number}, load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
                flush=True,
            )
        sync = measure_sync(workdir, args.sync_rounds)
    load_after = os.getloadavg()

    print(
        f"\nmodel {model}, {args.tokens} tokens per stream, {args.rounds} rounds of best of "
        f"{args.repeats}; load average before {_load(load_before)}, after {_load(load_after)}"
    )
    print(
        "tok/s: the best round; ratio: to 1 rank in the same round, median over rounds; "
        "CPU: ms of CPU per token, all ranks, median over rounds"
    )
    print(
        f"{'':18} {'1 stream tok/s':>14} {'ratio':>6} {'TTFT ms':>8} {'CPU':>5} "
        f"{f'{args.streams} streams tok/s':>16} {'ratio':>6} {'CPU':>5} {'idle CPU-s':>11}"
    )
    for name in CONFIGS:
        one = [r[name].one for r in rounds]
        many = [r[name].many for r in rounds]
        ratio_one = statistics.median(
            r[name].one.decode_tps / r["1 rank"].one.decode_tps for r in rounds
        )
        ratio_many = statistics.median(
            r[name].many.aggregate_tps / r["1 rank"].many.aggregate_tps for r in rounds
        )
        print(
            f"{name:18} {max(x.decode_tps for x in one):14.1f} {ratio_one:6.2f} "
            f"{min(x.ttft for x in one) * 1000:8.1f} "
            f"{statistics.median(x.cpu_per_token for x in one) * 1000:5.1f} "
            f"{max(x.aggregate_tps for x in many):16.1f} {ratio_many:6.2f} "
            f"{statistics.median(x.cpu_per_token for x in many) * 1000:5.1f} "
            f"{max(r[name].idle_cpu for r in rounds):6.2f} / {args.idle_seconds:.0f}s"
        )
    print("\nstep exchange between 2 ranks over loopback (no model):")
    for name, seconds in sync.items():
        print(f"  {name:20} {seconds * 1e6:8.0f} us per exchange")


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    main()
