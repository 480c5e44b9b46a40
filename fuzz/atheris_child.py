"""The atheris (libFuzzer) process for one target: `python -m fuzz.atheris_child`.

libFuzzer owns its process (it exits when done or on the first crash), so each
target runs in a child of `python -m fuzz`. The code under test (exo_trio) is
imported inside `atheris.instrument_imports`, which is why nothing here imports it
before: coverage feedback comes from exo_trio's own branches. Inputs that reach
new coverage go to a work corpus; the seed corpus in the repo is only read.
"""

from __future__ import annotations

import argparse
import random
import sys

import atheris


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--seconds", type=int, required=True)
    parser.add_argument("--work", required=True, help="corpus dir libFuzzer may write")
    parser.add_argument("--crashes", required=True, help="where crash inputs are written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with atheris.instrument_imports(include=["exo_trio"]):
        from fuzz.targets import TARGETS

        target = TARGETS[args.target]
        harness = target.make()
    from fuzz.mutate import RandomChoices, mutate

    def one(data: bytes) -> None:
        harness.one(data)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.3:
            return bytes(atheris.Mutate(data, max_size))
        return mutate(data, RandomChoices(rng), header=target.header)[:max_size]

    libfuzzer_args = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        "-print_final_stats=1",
        f"-artifact_prefix={args.crashes}/",
        "-max_len=65536",
        "-timeout=60",
        "-rss_limit_mb=6144",
        f"-seed={args.seed}",
        args.work,
        str(target.corpus),
    ]
    atheris.Setup(libfuzzer_args, one, custom_mutator=custom_mutator if target.json else None)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
