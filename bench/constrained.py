"""Per-token cost of constrained decoding against unconstrained, in one run.

    python -m bench.constrained [--size medium|demo | --model DIR] [--tokens 64] [--repeats 5]

The runner's Engine decodes 1 stream, then 8 streams together, each first free
and then under a JSON-schema grammar (runner/guide.py: an llguidance matcher per
request, its mask applied as a logits processor inside the batch), alternating
free and constrained runs, greedy with EOS banned so every run has the same
length. The schema is an open-ended array of small objects, so the grammar never
ends early and keeps the mask busy (keys, punctuation, enums, bounded strings and
integers) rather than sitting inside one long string. The figures are the decode
time per token per stream (first token excluded) in wall time and in this
process's CPU time (all its threads: what the step costs, less disturbed by other
work on a shared machine), best and median of the repeats; the goal is
constrained <= 1.10x free. On a machine shared with other work both swing by tens
of percent between runs, so the benchmark also times the constraint's own work
directly: the time spent computing each token's mask (llguidance, and the mask
made an MLX array), per token per stream, against a free token's share of the
step. (Reading the last token back before the mask is not counted: it waits for
the step before, which the free decoder waits for at the end of its step anyway;
what a constrained request gives up there is the overlap of building the next
step's graph with the previous step's compute, which the wall and CPU figures
include.) OpenBLAS is preloaded when present, as in
bench.node_vs_mlx.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median

import llguidance

from bench.node_vs_mlx import add_model_arguments, preload_blas
from exo_trio.demo_model import build_demo_model
from exo_trio.runner import guide
from exo_trio.runner.engine import Engine
from exo_trio.types import ChunkGenerated, SamplingParams, TextGeneration

SCHEMA = {
    "type": "array",
    "minItems": 1000,  # never complete within a run: every stream runs its length
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "count": {"type": "integer", "minimum": 0, "maximum": 9999},
            "kind": {"enum": ["alpha", "beta", "gamma"]},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "count", "kind", "ok"],
        "additionalProperties": False,
    },
}


def grammar() -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA,
        overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    )


def decode_seconds_per_token(
    engine: Engine, streams: int, tokens: int, constrained: bool, tag: str
) -> tuple[float, float]:
    """(wall, CPU) seconds per decode step of the streams."""
    ban = {t: -1e9 for t in engine.eos_token_ids}
    g = grammar() if constrained else None
    for i in range(streams):
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"List some things, please ({tag} {i})."}],
            add_generation_prompt=True,
        )
        params = SamplingParams(max_tokens=tokens, temperature=0.0, logit_bias=ban, grammar=g)
        cmd = TextGeneration(
            request_id=f"{tag}-{i}", model="m", prompt_tokens=list(prompt), params=params
        )
        assert engine.submit(cmd) == []
    started: set[str] = set()
    t0 = c0 = 0.0
    done = 0
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, ChunkGenerated) and event.seq == 0:
                started.add(event.request_id)
                if len(started) == streams:
                    t0, c0 = time.perf_counter(), time.process_time()
            elif not isinstance(event, ChunkGenerated):
                done += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert done == streams
    return wall / (tokens - 1), cpu / (tokens - 1)


class GuideClock:
    """Total time spent computing masks (Guide._allowed): the constraint's own work."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original = guide.Guide._allowed

        def timed(this: guide.Guide) -> object:
            start = time.perf_counter()
            try:
                return original(this)
            finally:
                self.seconds += time.perf_counter() - start

        guide.Guide._allowed = timed  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.set_defaults(size="medium")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blas", default="auto", help="auto, none, or a libopenblas path")
    args = parser.parse_args()
    blas = preload_blas(args.blas, "bench.constrained")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_demo_model(Path(tmp) / "bench", args.size)
        engine = Engine.load(model_dir, "m", max_batch=8)
        print(f"model {model_dir.name} ({args.size}), BLAS {blas}, {args.tokens} tokens/stream")
        decode_seconds_per_token(engine, 1, 8, True, "warm")  # first-use costs
        clock = GuideClock()
        for streams in (1, 8):
            runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            clock.seconds = 0.0
            for r in range(args.repeats):
                for constrained in (False, True):
                    tag = f"{streams}-{r}-{constrained}"
                    runs[constrained].append(
                        decode_seconds_per_token(engine, streams, args.tokens, constrained, tag)
                    )
            # The processor runs once per token per stream, the first token included.
            own = clock.seconds / (args.repeats * streams * args.tokens)
            free_wall = median(run[0] for run in runs[False]) / streams
            print(
                f"{streams} stream(s): the constraint's own work {own * 1e3:.3f} ms per token "
                f"per stream = {own / free_wall:.3f} of a free token's share of the step "
                f"({free_wall * 1e3:.2f} ms, median)"
            )
            for i, kind in ((0, "wall"), (1, "CPU")):
                free = [run[i] for run in runs[False]]
                bound = [run[i] for run in runs[True]]
                print(
                    f"{streams} stream(s), {kind}: free {min(free) * 1e3:.2f} ms/token, "
                    f"constrained {min(bound) * 1e3:.2f} ms/token: constrained / free = "
                    f"{min(bound) / min(free):.3f} best, {median(bound) / median(free):.3f} median"
                )


if __name__ == "__main__":
    main()
