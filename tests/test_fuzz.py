"""The fuzz targets in the test suite: seeds, regressions, and short runs.

- Every seed in fuzz/corpus/ passes its target (the seeds are valid inputs, so a
  failure here is a change in behaviour, not fuzzing luck).
- Every crash the fuzzers found is in fuzz/regressions/TARGET/ and must pass now;
  the few that are reported but not yet fixed (outside the API and framing code)
  are replayed strictly as expected failures, so fixing them turns these tests red
  until the xfail is removed.
- A short, seeded hypothesis run of every target (a fixed number of inputs, so the
  suite's time is stable), and a two-second atheris run where atheris installs.
Long runs: `python -m fuzz --all --seconds N` (docs/fuzzing.md).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from fuzz import engine_hypothesis
from fuzz.targets import TARGETS, Harness, Target

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = ROOT / "fuzz" / "regressions"

# Crash inputs whose bug is outside exo_trio/api and framing, reported to the
# owners and still open: (target, file) -> what is wrong.
OPEN: dict[tuple[str, str], str] = {}

# Inputs per target in the short runs: API targets cost ~5 ms an input, the others
# well under 1 ms (link scripts ~3 ms).
SHORT_RUN = {"api": 150, "link": 150, "runner_stream": 400}


@pytest.fixture(scope="module")
def harnesses() -> Iterator[dict[str, Harness]]:
    made: dict[str, Harness] = {}
    yield made
    for harness in made.values():
        harness.close()


def harness_for(harnesses: dict[str, Harness], target: Target) -> Harness:
    if target.name not in harnesses:
        harnesses[target.name] = target.make()
    return harnesses[target.name]


def files(kind: str) -> list[tuple[str, Path]]:
    out = []
    for name, target in TARGETS.items():
        directory = target.corpus if kind == "seeds" else REGRESSIONS / name
        if directory.is_dir():
            out += [(name, p) for p in sorted(directory.iterdir()) if p.is_file()]
    return out


@pytest.mark.parametrize(("name", "path"), files("seeds"), ids=lambda v: getattr(v, "name", v))
def test_every_seed_passes(harnesses: dict[str, Harness], name: str, path: Path) -> None:
    harness_for(harnesses, TARGETS[name]).one(path.read_bytes())


def regression_cases() -> list[object]:
    cases: list[object] = []
    for name, path in files("regressions"):
        why = OPEN.get((name, path.name))
        marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
        case_id = f"{name}/{path.name}"
        cases.append(pytest.param(name, path, why is not None, marks=marks, id=case_id))
    return cases


@pytest.mark.parametrize(("name", "path", "strict"), regression_cases())
def test_every_crash_found_stays_fixed(
    harnesses: dict[str, Harness], name: str, path: Path, strict: bool
) -> None:
    target = TARGETS[name]
    if strict:
        # Known open: replay without the fuzzer's tolerance for it.
        from fuzz.frame_targets import RunnerStreamHarness
        from fuzz.link_targets import BeaconHarness, LinkHarness

        strict_harness: Harness = (
            BeaconHarness(strict=True)
            if name == "beacons"
            else RunnerStreamHarness(strict=True)
            if name == "runner_stream"
            else LinkHarness(strict=True)
        )
        try:
            strict_harness.one(path.read_bytes())
        finally:
            strict_harness.close()  # puts back the log levels it lowered
    else:
        harness_for(harnesses, target).one(path.read_bytes())


@pytest.mark.parametrize("name", list(TARGETS))
def test_short_fuzz_run(harnesses: dict[str, Harness], name: str) -> None:
    target = TARGETS[name]
    budget = next((n for prefix, n in SHORT_RUN.items() if name.startswith(prefix)), 1000)
    result = engine_hypothesis.run(
        target, 30, rng_seed=1234, max_inputs=budget, harness=harness_for(harnesses, target)
    )
    assert result.error is None, f"{name}: {result.error}\ninput: {result.crash!r}"
    assert result.inputs >= budget


def test_link_seeds_still_reach_an_authenticated_link() -> None:
    """The link seeds are scripts of the real handshake; if the protocol changes
    under them they would only ever fuzz its first message. Catch that here."""
    from fuzz.link_targets import run_link

    for name in ("link_handshake", "link_frames"):
        ups = delivered = 0
        for seed in TARGETS[name].seeds():
            outcome = trio.run(run_link, seed, clock=trio.testing.MockClock(autojump_threshold=0))
            ups += outcome["ups"]
            delivered += outcome["delivered"]
        assert ups >= 3, f"{name}: the seeds no longer complete a handshake (update fuzz/seeds.py)"
    assert delivered >= 2, "the link_frames seeds no longer deliver a message"


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_engine_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            "runner_frames",
            "--seconds",
            "2",
            "--engine",
            "atheris",
            "--crashes",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "runner_frames      atheris" in proc.stdout
