"""exo-trio against mlx_lm.server and raw mlx-lm, every workload, in one run.

    python -m bench.peers [--model DIR | --size medium] [--repeats 6] [--tokens 128]
                          [--burst-tokens 64] [--skip multiturn,abandon,...]

Starts, on the same model directory: an exo-trio node with its defaults, one with
`--cpu-affinity off`, and mlx_lm.server (its defaults); raw mlx-lm runs in a
fresh process per measurement (bench/raw_mlx.py), unpinned and warmed up, as a
user runs it. Every request is greedy with EOS banned (`logit_bias`), prompts are
unique per request (no cache helps, but in the conversation). OpenBLAS is
preloaded for every side when found (`--blas none` turns that off; the node's
runner gets it anyway, see exo_trio/blas.py).

Each repeat runs every workload on every side, the sides' order rotating (so a
drift of the machine hits all alike); the load average is printed per repeat.
Figures are medians over repeats (ranges); ratios are medians of the per-repeat
ratios (ranges), exo-trio over the other side (paired.py).

Workloads:

* 1 stream, `--tokens` tokens: decode tokens/s (first to last token).
* 8 streams sent at once, `--burst-tokens` each: aggregate tokens/s end to end
  (first send to last token) and steady (after the last stream's first token);
  the spread of their first tokens; the slowest first token.
* a short request joining a decoding stream: its time to first token.
* a non-streaming client that goes away after 1 s of a 256-token request: CPU
  seconds the server burns afterwards.
* the 6-turn conversation of bench/multiturn.py: the last turn's first token
  (exo-trio with its prefix cache, mlx_lm.server with its prompt cache).

Goals (issue 18): 8-stream first-token spread <= 1.5 decode steps plus the
batch's prefill; 8-stream aggregate >= 1.0 of mlx_lm.server and >= 0.95 of raw
BatchGenerator; 1 stream >= 0.98 of raw; joining and cancelling no worse than
before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from bench import workloads
from bench.multiturn import conversation, eos_ban, user_turns
from bench.node_vs_mlx import add_model_arguments, preload_blas
from bench.paired import Series, paired_ratio, rotation, table
from bench.servers import Server, loadavg, start_exo, start_mlx_server

WORKLOADS = ("single", "burst", "join", "abandon", "multiturn")
EXO, UNPINNED, MLX, RAW = "exo-trio", "exo-trio unpinned", "mlx_lm.server", "raw mlx-lm"


def raw(model_dir: Path, what: str, tokens: int, streams: int = 8) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            *("-m", "bench.raw_mlx", what, "--model", str(model_dir)),
            *("--tokens", str(tokens), "--streams", str(streams)),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class Figures:
    """Every figure of every side, one value per repeat."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], Series] = {}

    def __call__(self, figure: str, side: str) -> Series:
        return self._series.setdefault((figure, side), Series())

    def add_repeat(self) -> None:
        """Pad every series to the same number of repeats (None where not measured)."""
        longest = max((len(s.values) for s in self._series.values()), default=0)
        for series in self._series.values():
            while len(series.values) < longest:
                series.add(None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, default_size="medium")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128, help="1 stream's tokens")
    parser.add_argument("--burst-tokens", type=int, default=64, help="each of the 8 streams'")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--skip", default="", help=f"comma-separated, of {','.join(WORKLOADS)}")
    parser.add_argument("--multiturn-tokens", type=int, default=1500)
    parser.add_argument("--blas", default="auto", help="auto, none, or a libopenblas path")
    args = parser.parse_args()
    blas = preload_blas(args.blas, "bench.peers")
    skip = set(filter(None, args.skip.split(",")))

    from exo_trio.demo_model import build_demo_model

    f = Figures()
    loads: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model or build_demo_model(work / "model", args.size)
        ban = eos_ban(model_dir)
        turns, reply = 6, 48
        per_turn = max(8, (args.multiturn_tokens - (turns - 1) * (reply + 8)) // turns - 8)
        users = user_turns(model_dir, turns, per_turn)
        servers: dict[str, Server] = {}
        try:
            servers[EXO] = start_exo(model_dir, work, EXO)
            servers[UNPINNED] = start_exo(model_dir, work, UNPINNED, "--cpu-affinity", "off")
            servers[MLX] = start_mlx_server(model_dir, work)
            for server in servers.values():  # model load, first-call costs
                trio.run(workloads.one_stream, server, 8, ban)
                trio.run(workloads.burst, server, 2, 4, ban)
            runners = {n: s.info.get("runner") or {} for n, s in servers.items() if s.info}
            blas_seen = {n: r.get("blas") for n, r in runners.items()}  # type: ignore[union-attr]
            for repeat in range(args.repeats):
                loads.append(loadavg())
                sides = rotation([EXO, UNPINNED, MLX, RAW], repeat)
                print(f"repeat {repeat + 1}: load {loads[-1]}, order {sides}", file=sys.stderr)
                for side in sides:
                    run_side(f, side, servers, model_dir, args, ban, users, skip, repeat)
                f.add_repeat()
        finally:
            for server in servers.values():
                server.stop()

    print(
        f"model: {model_dir.name}; {args.repeats} repeats; BLAS: {blas}; "
        f"load average per repeat: {', '.join(loads)}"
    )
    print(f"exo-trio runners compute with: {json.dumps(blas_seen)}")
    print(
        "figures: median over repeats (range); ratios: median of the per-repeat ratios "
        "exo-trio / other side (range)"
    )
    rows = []

    def row(label: str, figure: str, digits: int = 1, against_raw: bool = True) -> None:
        ours = f(figure, EXO)
        rows.append(
            [
                label,
                ours.summary(digits),
                f(figure, UNPINNED).summary(digits),
                f(figure, MLX).summary(digits),
                f(figure, RAW).summary(digits) if against_raw else "",
                paired_ratio(ours, f(figure, UNPINNED)),
                paired_ratio(ours, f(figure, MLX)),
                paired_ratio(ours, f(figure, RAW)) if against_raw else "",
            ]
        )

    n = args.streams
    row(f"1 stream, {args.tokens} tokens, tokens/s", "single_tps")
    row("1 stream, time to first token, s", "single_ttft", 3)
    row(f"{n} streams at once, aggregate tokens/s, steady", "burst_steady", 1)
    row(f"{n} streams at once, aggregate tokens/s, end to end", "burst_e2e", 1)
    row(f"{n} streams at once, spread of their first tokens, s", "burst_spread", 3)
    row(f"{n} streams at once, slowest first token, s", "burst_slowest", 3)
    row("a request joining a decoding stream, first token, s", "join_ttft", 3, False)
    row("  the decoding stream's step, s", "join_step", 3, False)
    row("non-streaming client gone after 1 s, CPU burnt after, s", "abandon_cpu", 2, False)
    row("6-turn chat: prompt tokens of turn 6", "multiturn_prompt", 0, False)
    row("6-turn chat: turn 1 first token, s", "multiturn_first", 3, False)
    row("6-turn chat: turn 6 first token, s", "multiturn_last", 3, False)
    header = [
        "workload",
        EXO,
        UNPINNED,
        MLX,
        RAW,
        f"{EXO} / unpinned",
        f"{EXO} / {MLX}",
        f"{EXO} / raw",
    ]
    print(table(header, rows))


def run_side(
    f: Figures,
    side: str,
    servers: dict[str, Server],
    model_dir: Path,
    args: argparse.Namespace,
    ban: dict[str, float],
    users: list[str],
    skip: set[str],
    repeat: int,
) -> None:
    n = args.streams
    if side == RAW:
        if "single" not in skip:
            single = raw(model_dir, "single", args.tokens)
            f("single_tps", RAW).add(single["decode_tps"])
            f("single_ttft", RAW).add(single["ttft"])
        if "burst" not in skip:
            batch = raw(model_dir, "batch", args.burst_tokens, n)
            f("burst_steady", RAW).add(batch["steady_tps"])
            f("burst_e2e", RAW).add(batch["end_to_end_tps"])
            f("burst_spread", RAW).add(batch["first_token_spread"])
            f("burst_slowest", RAW).add(batch["slowest_first_token"])
        return
    server = servers[side]
    if "single" not in skip:
        stream = trio.run(workloads.one_stream, server, args.tokens, ban)
        f("single_tps", side).add(stream.decode_tps)
        f("single_ttft", side).add(stream.ttft)
    if "burst" not in skip:
        burst = trio.run(workloads.burst, server, n, args.burst_tokens, ban)
        f("burst_steady", side).add(burst.steady_tps)
        f("burst_e2e", side).add(burst.end_to_end_tps)
        f("burst_spread", side).add(burst.first_token_spread)
        f("burst_slowest", side).add(burst.slowest_first_token)
    if "join" not in skip:
        joined = trio.run(workloads.join, server, args.tokens, ban)
        f("join_ttft", side).add(joined.ttft)
        f("join_step", side).add(joined.step)
    if "abandon" not in skip:
        f("abandon_cpu", side).add(trio.run(workloads.abandoned, server, 256, ban))
    if "multiturn" not in skip and side != UNPINNED:
        tag = f"peers {repeat} {side}"
        turns = trio.run(conversation, server, tag, users, 48, ban)
        f("multiturn_prompt", side).add(turns[-1].prompt_tokens)
        f("multiturn_first", side).add(turns[0].ttft)
        f("multiturn_last", side).add(turns[-1].ttft)


if __name__ == "__main__":
    main()
