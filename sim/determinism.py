"""The same choice list gives the same trace digest: here, again, and elsewhere.

`check()` runs a sample of seeds in this process, runs them again in reverse order
(state leaking from one run into the next shows up as a different digest), and
runs them in a fresh interpreter with a different PYTHONHASHSEED (set iteration
order, hash-based ids and import-time state all change there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sim.schedule import Policy
from sim.sweep import run_one

ROOT = Path(__file__).resolve().parent.parent


def digests(
    seeds: list[int],
    policy: Policy = "native",
    nodes: int | None = None,
    scenario: str | None = None,
) -> dict[int, str]:
    return {seed: run_one(seed, policy, None, nodes, scenario).digest for seed in seeds}


def fresh_process_digests(
    seeds: list[int],
    policy: Policy,
    hash_seed: int,
    nodes: int | None = None,
    scenario: str | None = None,
) -> dict[int, str]:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    command = [sys.executable, "-m", "sim", "--digests", "--policy", policy, "--json"]
    if nodes is not None:
        command += ["--nodes", str(nodes)]
    if scenario is not None:
        command += ["--scenario", scenario]
    command += ["--seeds-list", ",".join(map(str, seeds))]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"digest subprocess failed ({done.returncode}):\n{done.stderr[-2000:]}")
    last = done.stdout.strip().splitlines()[-1]
    return {int(k): v for k, v in json.loads(last)["digests"].items()}


def other_hash_seed() -> int:
    current = os.environ.get("PYTHONHASHSEED", "")
    return 4242 if current != "4242" else 2424


def check(
    seeds: list[int],
    policy: Policy = "native",
    nodes: int | None = None,
    scenario: str | None = None,
) -> list[str]:
    """Mismatches as readable lines (empty: deterministic)."""
    first = digests(seeds, policy, nodes, scenario)
    again = {seed: run_one(seed, policy, None, nodes, scenario).digest for seed in reversed(seeds)}
    fresh = fresh_process_digests(seeds, policy, other_hash_seed(), nodes, scenario)
    problems = []
    for seed in seeds:
        if again[seed] != first[seed]:
            problems.append(
                f"seed {seed}: rerun in this process gave {again[seed]} != {first[seed]}"
            )
        if fresh.get(seed) != first[seed]:
            problems.append(
                f"seed {seed}: fresh process (PYTHONHASHSEED={other_hash_seed()}) gave "
                f"{fresh.get(seed)} != {first[seed]}"
            )
    return problems
