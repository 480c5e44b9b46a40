"""A conversation whose prompt grows every turn: time to first token per turn, with
the prefix cache (warm), without it (cold), and on mlx_lm.server with its prompt
cache, in one run.

    python -m bench.multiturn [--model DIR | --size medium] [--turns 6]
                              [--target-tokens 1500] [--reply-tokens 48] [--repeats 3]

Each turn sends the whole conversation so far (the previous turns' user messages
and the server's own replies, as a chat client does) plus a new user message of
about (target - replies) / turns tokens, so that the last turn's prompt is about
`--target-tokens` long; the reply is `--reply-tokens` greedy tokens with EOS
banned. Three servers on the same model directory, started by the benchmark:
exo-trio (its default prefix cache), exo-trio with `--prompt-cache-bytes 0`
(cold: every turn prefilled from scratch), and mlx_lm.server (its LRU prompt
cache, default settings). Each repeat runs a fresh conversation (its first line
is unique) on every server, the order rotating; figures are medians over the
repeats (ranges), ratios medians of the per-repeat ratios (paired.py).

Goal (issue 18): the last turn warm at most 0.15 of cold, and no slower than
mlx_lm.server's.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.node_vs_mlx import add_model_arguments, preload_blas
from bench.paired import Series, paired_ratio, rotation, table
from bench.servers import Server, loadavg, start_exo, start_mlx_server
from bench.workloads import client_for, stream_chat

# The user turns are cut from this text (rotated per turn, so no two are alike).
PROSE = (
    "Structured concurrency ties the lifetime of every task to a scope in the code. "
    "A nursery opens, tasks start inside it, and the nursery does not close until "
    "all of them have finished, so no task can outlive the block that started it. "
    "Errors travel upward: when a child fails, its siblings are cancelled and the "
    "exception reaches the parent, which decides what happens next. Cancellation "
    "is scoped too: a deadline set on a cancel scope applies to everything inside, "
    "however deeply nested, and a task blocked on the network wakes up when its "
    "scope is cancelled. This makes resource cleanup predictable, because every "
    "file, socket and lock is released by the code that acquired it, in order. "
    "Streaming servers benefit most: each request owns a channel, opened before "
    "any work is dispatched and closed when the request ends, whatever the reason. "
)


@dataclass
class TurnResult:
    prompt_tokens: int
    ttft: float
    cached_tokens: int | None


def user_turns(model_dir: Path, turns: int, tokens_each: int) -> list[str]:
    """`turns` user messages of about `tokens_each` tokens each."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    base = tokenizer.encode(PROSE * 8)
    out = []
    for k in range(turns):
        start = (k * 97) % (len(base) - tokens_each)
        out.append(tokenizer.decode(base[start : start + tokens_each]))
    return out


async def conversation(
    server: Server, tag: str, users: list[str], reply_tokens: int, ban: dict[str, float]
) -> list[TurnResult]:
    messages: list[dict[str, str]] = []
    results = []
    async with client_for(server) as client:
        for k, text in enumerate(users):
            content = f"[{tag}] {text}" if k == 0 else text
            messages.append({"role": "user", "content": content})
            stream = await stream_chat(client, server, messages, reply_tokens, ban)
            messages.append({"role": "assistant", "content": stream.text})
            results.append(TurnResult(stream.prompt_tokens, stream.ttft, stream.cached_tokens))
    return results


def eos_ban(model_dir: Path) -> dict[str, float]:
    """logit_bias banning every EOS id the servers stop on (mlx_lm.load's set: the
    tokenizer's and generation_config.json's)."""
    from mlx_lm import load

    _, tokenizer = load(str(model_dir), lazy=True)
    return {str(t): -100.0 for t in tokenizer.eos_token_ids}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, default_size="medium")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--target-tokens", type=int, default=1500)
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blas", default="auto", help="auto, none, or a libopenblas path")
    args = parser.parse_args()
    blas = preload_blas(args.blas, "bench.multiturn")

    from exo_trio.demo_model import build_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model or build_demo_model(work / "model", args.size)
        overhead = 8  # template tokens per message, about
        per_turn = max(
            8,
            (args.target_tokens - (args.turns - 1) * (args.reply_tokens + overhead)) // args.turns
            - overhead,
        )
        users = user_turns(model_dir, args.turns, per_turn)
        ban = eos_ban(model_dir)
        servers: dict[str, Server] = {}
        try:
            servers["warm"] = start_exo(model_dir, work, "exo-trio")
            servers["cold"] = start_exo(
                model_dir, work, "exo-trio cold", "--prompt-cache-bytes", "0"
            )
            servers["mlx"] = start_mlx_server(model_dir, work)
            # One short conversation each first: model loads, first-call costs.
            for server in servers.values():
                trio.run(conversation, server, "warm-up", users[:2], 4, ban)
            ttft = {name: [Series() for _ in range(args.turns)] for name in servers}
            prompts = [Series() for _ in range(args.turns)]
            cached = [Series() for _ in range(args.turns)]
            loads = []
            for repeat in range(args.repeats):
                loads.append(loadavg())
                for name in rotation(list(servers), repeat):
                    tag = f"conversation {repeat}"
                    server = servers[name]
                    turns = trio.run(conversation, server, tag, users, args.reply_tokens, ban)
                    for k, turn in enumerate(turns):
                        ttft[name][k].add(turn.ttft)
                        if name == "warm":
                            prompts[k].add(turn.prompt_tokens)
                            cached[k].add(turn.cached_tokens)
        finally:
            for server in servers.values():
                server.stop()

    print(
        f"model: {model_dir.name}; {args.turns} turns, {args.reply_tokens}-token replies, "
        f"{args.repeats} repeats; BLAS: {blas}; load average per repeat: {', '.join(loads)}"
    )
    print(
        "time to first token, seconds, median (range); ratios: median of per-repeat ratios (range)"
    )
    rows = []
    for k in range(args.turns):
        rows.append(
            [
                str(k + 1),
                prompts[k].summary(0),
                cached[k].summary(0),
                ttft["warm"][k].summary(3),
                ttft["cold"][k].summary(3),
                ttft["mlx"][k].summary(3),
                paired_ratio(ttft["warm"][k], ttft["cold"][k]),
                paired_ratio(ttft["warm"][k], ttft["mlx"][k]),
            ]
        )
    header = [
        "turn",
        "prompt tokens",
        "cached",
        "exo-trio warm",
        "exo-trio cold",
        "mlx_lm.server",
        "warm / cold",
        "warm / mlx_lm.server",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
