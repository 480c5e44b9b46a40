"""Raw mlx-lm, as a user runs it: the baseline the servers are compared with.

    python -m bench.raw_mlx single|batch --model DIR --tokens N [--streams 8]

prints one JSON line. Run in a fresh process per measurement, unpinned (the cores
its parent has), after a warm-up generation of its own, like a server's first
request; greedy with the EOS ids banned by a logits processor, as the servers'
requests ban them with `logit_bias`. The prompts are the chat-templated prompts
of the HTTP workloads.

* single: `stream_generate`, one prompt: time to first token, decode tokens/s.
* batch: `BatchGenerator` (mlx-lm's defaults) with N prompts inserted at once:
  aggregate tokens/s end to end (insert to last token) and steady (after the
  last sequence's first token), and the spread of the first tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.workloads import STORY


def _setup(model_dir: Path) -> tuple[Any, Any, list[Any]]:
    from mlx_lm import load
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = load(str(model_dir))
    ban = {t: -100.0 for t in tokenizer.eos_token_ids}
    return model, tokenizer, make_logits_processors(logit_bias=ban)


def _prompt(tokenizer: Any, index: int) -> list[int]:
    messages = [{"role": "user", "content": f"[raw {index}] {STORY}"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def single(model_dir: Path, tokens: int) -> dict[str, float]:
    from mlx_lm import stream_generate

    model, tokenizer, processors = _setup(model_dir)

    def run(prompt: list[int], n: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        stamps = []
        for _ in stream_generate(
            model, tokenizer, prompt, max_tokens=n, logits_processors=processors
        ):
            stamps.append(time.perf_counter())
        return stamps[0] - start, stamps[-1] - stamps[0], len(stamps)

    run(_prompt(tokenizer, -1), 8)  # warm-up
    ttft, decode, count = run(_prompt(tokenizer, 0), tokens)
    assert count == tokens, count
    return {"ttft": ttft, "decode_tps": (count - 1) / decode}


def batch(model_dir: Path, tokens: int, streams: int) -> dict[str, float]:
    from mlx_lm.generate import BatchGenerator

    model, tokenizer, processors = _setup(model_dir)

    def run(prompts: list[list[int]], n: int) -> dict[str, float]:
        generator = BatchGenerator(model)
        start = time.perf_counter()
        generator.insert(
            prompts, max_tokens=[n] * len(prompts), logits_processors=[processors] * len(prompts)
        )
        firsts: dict[int, float] = {}
        produced_after: list[float] = []
        done = 0
        total = 0
        while done < len(prompts):
            _, responses = generator.next()
            now = time.perf_counter()
            for r in responses:
                total += 1
                firsts.setdefault(r.uid, now)
                produced_after.append(now)
                if r.finish_reason is not None:
                    done += 1
        generator.close()
        end = time.perf_counter()
        last_first = max(firsts.values())
        after = sum(1 for t in produced_after if t > last_first)
        return {
            "end_to_end_tps": total / (end - start),
            "steady_tps": after / (end - last_first),
            "first_token_spread": last_first - min(firsts.values()),
            "slowest_first_token": last_first - start,
        }

    run([_prompt(tokenizer, -1 - i) for i in range(2)], 4)  # warm-up
    return run([_prompt(tokenizer, i) for i in range(streams)], tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["single", "batch"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    if args.what == "single":
        result = single(args.model, args.tokens)
    else:
        result = batch(args.model, args.tokens, args.streams)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
