"""This node through HTTP against raw mlx-lm, on the same model, in one run.

    python -m bench.node_vs_mlx [--model DIR | --size demo|medium] [--tokens 128] [--repeats 8]

Measures (never two at once, so they do not share the cores; raw and node runs
alternate, repeat by repeat):

1. raw mlx-lm `stream_generate`, one stream: decode tokens/s and time to first token;
2. raw mlx-lm `BatchGenerator` with 8 sequences: aggregate decode tokens/s;
3. an `exo-trio node` process serving the same model, driven over HTTP with
   streaming chat completions: one stream, then 8 concurrent streams;
4. the time to first token of a request that arrives while another stream decodes,
   in units of that stream's decode step.

and prints each figure with its ratio to the raw baseline. Exact lengths come from
`ignore_eos` (no logits processor, so the batch samples in one call, like the
baseline). Without --model the demo model is built into a temporary directory.

On Linux the mlx CPU wheel links a reference BLAS that makes prefill (matrix-matrix
products) about 5x slower per token than decode here, which would swamp every
time-to-first-token figure. When an OpenBLAS library is found (Debian:
`apt-get install libopenblas0-pthread`), the benchmark re-executes itself with it
preloaded, so the baseline and the node (whose processes inherit the environment)
run on the same BLAS. `--blas none` turns that off.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from exo_trio.affinity import format_cores, pin_this_thread, split_cores, usable_cores
from exo_trio.demo_model import build_demo_model
from exo_trio.prompts import HFPromptEncoder
from tests.nodeproc import start_node

MESSAGES = [{"role": "user", "content": "Write a long story about structured concurrency."}]
# The request that joins a running stream.
JOIN_CONTENT = "hi"


@dataclass
class Run:
    tokens: int
    ttft: float  # seconds from request to first token
    decode_time: float  # seconds from first to last token

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_time if self.decode_time > 0 else 0.0


def best(runs: list[float]) -> float:
    return max(runs)


def raw_single(model_dir: Path, prompt: list[int], tokens: int) -> Run:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_dir))
    # No EOS: generate exactly `tokens` tokens, like ignore_eos on the node.
    tokenizer._eos_token_ids = set()
    start = time.perf_counter()
    first = last = start
    count = 0
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=tokens, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        count += 1
        last = time.perf_counter()
        if count == 1:
            first = last
        if response.finish_reason:
            break
    return Run(count, first - start, last - first)


def raw_batch(model_dir: Path, prompt: list[int], tokens: int, batch: int) -> float:
    """Aggregate decode tokens/s of BatchGenerator with `batch` sequences decoding."""
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, _ = load(str(model_dir))
    generator = BatchGenerator(model, max_tokens=tokens, completion_batch_size=batch)
    generator.insert([list(prompt) for _ in range(batch)], [tokens] * batch)
    produced = 0
    started: float | None = None
    while True:
        _, responses = generator.next()
        if responses and started is None:
            started = time.perf_counter()  # all sequences decoding from here on
            continue
        produced += len(responses)
        if any(r.finish_reason for r in responses) and not len(generator._generation_batch):
            break
        if not responses and started is not None:
            break
    elapsed = time.perf_counter() - (started or time.perf_counter())
    generator.close()
    return produced / elapsed


def raw_prefill(model_dir: Path, prompt: list[int], repeats: int = 7) -> float:
    """Seconds for mlx-lm's model to take `prompt` in one forward pass on a fresh
    cache and sample its first token (median): the compute a joining request's
    first token needs however it is scheduled."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(model_dir))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        cache = make_prompt_cache(model)
        start = time.perf_counter()
        logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
        mx.eval(mx.argmax(logits, axis=-1))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


async def http_stream(client: httpx.AsyncClient, tokens: int, content: str | None = None) -> Run:
    messages = [{"role": "user", "content": content}] if content else MESSAGES
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = trio.current_time()
    first = last = start
    count = 0
    usage_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if '"content":"' in line and '"content":""' not in line:
                count += 1
                last = trio.current_time()
                if count == 1:
                    first = last
            if '"usage":{' in line:
                usage_tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
    assert usage_tokens == tokens, (usage_tokens, tokens)
    return Run(usage_tokens, first - start, last - first)


async def http_concurrent(base_url: str, tokens: int, streams: int) -> float:
    """Aggregate decode tokens/s with `streams` concurrent streams."""
    runs: list[Run] = []
    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        start = trio.current_time()

        async def one() -> None:
            runs.append(await http_stream(client, tokens))

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(one)
        total = trio.current_time() - start
    # Exclude the shared prefill: time from the last first-token to the end.
    ttft = max(r.ttft for r in runs)
    return sum(r.tokens - 1 for r in runs) / (total - ttft)


@dataclass
class Join:
    ttft: float  # seconds from the joining request's send to its first token
    step: float  # the running stream's median decode step, seconds
    steps_elapsed: int  # the running stream's tokens that arrived in between


async def joining_ttft(base_url: str, tokens: int) -> Join:
    """A short request arriving while a long stream decodes: its time to first
    token, the running stream's median decode step, and how many of the running
    stream's decode steps (its tokens, as the client sees them) went by between
    the request's send and its first token."""
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        body = {
            "model": "bench",
            "messages": MESSAGES,
            "max_tokens": tokens * 4,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        stamps: list[float] = []
        joined = trio.Event()
        result: list[Run] = []

        async def long_stream() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        stamps.append(trio.current_time())
                        if len(stamps) == 20:
                            joined.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)
            await joined.wait()
            sent = trio.current_time()
            result.append(await http_stream(client, 4, content=JOIN_CONTENT))
            nursery.cancel_scope.cancel()
    first = sent + result[0].ttft
    steps = [b - a for a, b in itertools.pairwise(stamps[10:])]
    elapsed = sum(1 for t in stamps if sent < t <= first)
    return Join(result[0].ttft, statistics.median(steps), elapsed)


def add_model_arguments(parser: argparse.ArgumentParser, default_size: str = "demo") -> None:
    """--model DIR, or --size: the demo model or the ~94M-parameter one, built in a
    temporary directory (the benchmarks share these)."""
    parser.add_argument("--model", type=Path)
    parser.add_argument(
        "--size",
        choices=["demo", "medium"],
        default=default_size,
        help="without --model: the demo model, or the ~94M-parameter one",
    )


def on_cores(cores: frozenset[int] | None) -> None:
    if cores:
        pin_this_thread(cores)


def timed(label: str, fn: Callable[[], float]) -> float:
    value = fn()
    print(f"  measured {label}: {value:.2f}", file=sys.stderr)
    return value


OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
]


def preload_blas(choice: str, module: str = "bench.node_vs_mlx") -> str:
    """Re-exec with an optimised BLAS preloaded (LD_PRELOAD works only at start)."""
    if choice == "none" or sys.platform != "linux":
        return "default"
    path = (
        choice
        if choice != "auto"
        else next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), "")
    )
    if not path:
        return "default (no OpenBLAS found)"
    if path not in os.environ.get("LD_PRELOAD", ""):
        env = {**os.environ, "LD_PRELOAD": path, "OPENBLAS_NUM_THREADS": "1"}
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--blas", default="auto", help="auto, none, or a libopenblas path")
    args = parser.parse_args()
    blas = preload_blas(args.blas)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model or build_demo_model(work / "bench", args.size)
        encoder = HFPromptEncoder(model_dir)
        prompt = encoder.chat_tokens(MESSAGES)
        join_prompt = encoder.chat_tokens([{"role": "user", "content": JOIN_CONTENT}])

        node = start_node(model_dir, work / "node")
        split = split_cores(usable_cores() or ())
        raw1: list[Run] = []
        node1: list[Run] = []
        raw8: list[float] = []
        node8: list[float] = []
        try:
            node.wait_healthy()

            async def http_single() -> Run:
                async with httpx.AsyncClient(base_url=node.base_url, timeout=300) as client:
                    await http_stream(client, 8)  # warm-up (and a fresh connection)
                    return await http_stream(client, args.tokens)

            # Raw and node runs alternate, so a drift in the machine's speed (a
            # shared host's neighbours, frequency scaling) hits both sides alike.
            # Raw mlx-lm computes on the cores the node gives its runner; this
            # process, as the HTTP client, runs on the node's own cores, as a
            # remote client would cost the runner nothing (exo_trio/affinity.py).
            for _ in range(args.repeats):
                on_cores(split.runners if split else None)
                raw1.append(raw_single(model_dir, prompt, args.tokens))
                on_cores(split.node if split else None)
                node1.append(trio.run(http_single))
            for _ in range(args.repeats):
                on_cores(split.runners if split else None)
                raw8.append(raw_batch(model_dir, prompt, args.tokens, 8))
                on_cores(split.node if split else None)
                node8.append(trio.run(http_concurrent, node.base_url, args.tokens, 8))
            joins = [
                trio.run(joining_ttft, node.base_url, args.tokens)
                for _ in range(max(10, args.repeats))
            ]
            on_cores(split.runners if split else None)
            join_prefill = raw_prefill(model_dir, join_prompt)
        finally:
            node.stop()

    raw1_tps = best([r.decode_tps for r in raw1])
    node1_tps = best([r.decode_tps for r in node1])
    raw1_ttft = min(r.ttft for r in raw1)
    node1_ttft = min(r.ttft for r in node1)
    raw8_tps, node8_tps = best(raw8), best(node8)
    join_ttft = statistics.median(j.ttft for j in joins)
    join_step = statistics.median(j.step for j in joins)
    join_steps = max(j.steps_elapsed for j in joins)

    placement = (
        f"runner and raw mlx-lm on cores {format_cores(split.runners)}, node and client on "
        f"{format_cores(split.node)}"
        if split
        else "no CPU pinning"
    )
    print(
        f"model: {model_dir.name}, {args.tokens} tokens per stream, best of {args.repeats}, "
        f"BLAS: {blas}; {placement}"
    )

    def row(label: str, raw: float, ours: float, digits: int = 1) -> None:
        print(f"{label:<44}{raw:>12.{digits}f}{ours:>12.{digits}f}{ours / raw:>8.3f}")

    print(f"{'figure':<44}{'raw mlx-lm':>12}{'exo-trio':>12}{'ratio':>8}")
    row("1 stream decode tokens/s", raw1_tps, node1_tps)
    row("1 stream time to first token (ms)", raw1_ttft * 1e3, node1_ttft * 1e3)
    row("8 streams decode tokens/s (BatchGenerator)", raw8_tps, node8_tps)
    print(
        f"joining request: first token after {join_ttft * 1e3:.1f} ms = "
        f"{join_ttft / join_step:.2f} times the running stream's decode step "
        f"({join_step * 1e3:.1f} ms/step); the running stream's decode steps in between: "
        f"{join_steps} at most (over {len(joins)} runs)"
    )
    # It is sent just after one of the running stream's tokens, so the step in
    # flight has about a whole step to go; then its own prompt must go through.
    floor = join_step + join_prefill
    print(
        f"  its compute floor: the step in flight + raw mlx-lm's one-pass prefill of its "
        f"{len(join_prompt)}-token prompt ({join_prefill * 1e3:.1f} ms = "
        f"{join_prefill / join_step:.2f} steps) = {floor / join_step:.2f} steps; "
        f"node / floor {join_ttft / floor:.3f}"
    )


if __name__ == "__main__":
    main()
