"""`python -m fuzz`: run fuzz targets.

    python -m fuzz TARGET [TARGET ...] --seconds N   fuzz the named targets
    python -m fuzz --all --seconds N                 every target, one after another
    python -m fuzz --list                            the targets
    python -m fuzz --replay TARGET FILE ...          run saved inputs (e.g. a crash)
    python -m fuzz --write-seeds                     regenerate the seed corpus

The engine is atheris (coverage-guided libFuzzer) when it is installed
(`pip install -e '.[fuzz]'`), hypothesis otherwise; `--engine` forces one. A crash
input is saved under the crash directory (default fuzz/crashes/TARGET/) and the
run of that target stops there. Exit status 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.engine_hypothesis import RunResult
from fuzz.targets import TARGETS, Target

CRASHES = Path(__file__).parent / "crashes"


def have_atheris() -> bool:
    return importlib.util.find_spec("atheris") is not None


def run_atheris(target: Target, seconds: float, seed: int, crashes: Path) -> RunResult:
    work = Path(tempfile.gettempdir()) / "exo-trio-fuzz" / "work" / target.name
    work.mkdir(parents=True, exist_ok=True)
    crash_dir = crashes / target.name
    crash_dir.mkdir(parents=True, exist_ok=True)
    before = set(crash_dir.iterdir())
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.atheris_child",
            target.name,
            f"--seconds={max(1, int(seconds))}",
            f"--work={work}",
            f"--crashes={crash_dir}",
            f"--seed={seed}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    elapsed = time.monotonic() - started
    log = proc.stderr + proc.stdout
    (work.parent / f"{target.name}.log").write_text(log)
    executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    progress = re.findall(r"^#(\d+)\s", log, re.MULTILINE)
    inputs = int(executed[-1]) if executed else int(progress[-1]) if progress else 0
    edges = re.findall(r"cov: (\d+)", log)
    new = sorted(set(crash_dir.iterdir()) - before)
    result = RunResult(target.name, "atheris", inputs, elapsed)
    result.coverage = int(edges[-1]) if edges else None
    if new:
        result.crash = new[0].read_bytes()
        result.error = _crash_summary(log) + f" (saved {new[0]})"
    elif proc.returncode != 0:
        result.error = f"libFuzzer exited {proc.returncode}: " + _crash_summary(log)
    return result


def _crash_summary(log: str) -> str:
    lines = [line for line in log.splitlines() if "PropertyViolation" in line or "Error" in line]
    return lines[-1].strip()[:300] if lines else log.strip().splitlines()[-1][:300] if log else ""


def save_crash(target: Target, data: bytes, crashes: Path) -> Path:
    crash_dir = crashes / target.name
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def run_target(target: Target, seconds: float, engine: str, seed: int, crashes: Path) -> RunResult:
    if engine == "atheris":
        return run_atheris(target, seconds, seed, crashes)
    from fuzz import engine_hypothesis

    result = engine_hypothesis.run(target, seconds, rng_seed=seed or None)
    if result.crash is not None:
        result.error = f"{result.error} (saved {save_crash(target, result.crash, crashes)})"
    return result


def replay(target: Target, files: list[Path]) -> int:
    harness = target.make()
    failures = 0
    try:
        for path in files:
            try:
                harness.one(path.read_bytes())
                print(f"ok    {path}")
            except Exception as exc:
                failures += 1
                print(f"FAIL  {path}: {type(exc).__name__}: {exc}")
    finally:
        harness.close()
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", nargs="*", help="target names (see --list)")
    parser.add_argument("--all", action="store_true", help="run every target")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="0: random")
    parser.add_argument("--crashes", type=Path, default=CRASHES)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--replay", nargs="+", metavar=("TARGET", "FILE"))
    parser.add_argument("--write-seeds", action="store_true")
    args = parser.parse_args(argv)

    if args.list:
        for target in TARGETS.values():
            print(f"{target.name:18} {target.about}")
        return 0
    if args.write_seeds:
        from fuzz.seeds import write_seeds

        for name, count in write_seeds().items():
            print(f"{name:18} {count} seeds")
        return 0
    if args.replay:
        name, *files = args.replay
        return replay(TARGETS[name], [Path(f) for f in files])

    names = list(TARGETS) if args.all else args.targets
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        parser.error(f"unknown target(s) {unknown}" if unknown else "name a target or --all")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "hypothesis"
    results = []
    for name in names:
        print(f"fuzzing {name} with {engine} for {args.seconds:g}s ...", flush=True)
        result = run_target(TARGETS[name], args.seconds, engine, args.seed, args.crashes)
        results.append(result)
        status = "CRASH " + (result.error or "") if result.error else "ok"
        print(f"  {result.inputs} inputs in {result.seconds:.0f}s: {status}", flush=True)
    print()
    print(f"{'target':18} {'engine':10} {'inputs':>10} {'seconds':>8} {'edges':>6}  result")
    for r in results:
        edges = str(r.coverage) if r.coverage is not None else "-"
        outcome = "crash" if r.error else "clean"
        print(f"{r.target:18} {r.engine:10} {r.inputs:>10} {r.seconds:>8.0f} {edges:>6}  {outcome}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
