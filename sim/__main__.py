"""python -m sim: sweep seeds, replay and shrink failures, hunt mutants.

    python -m sim [--seeds N] [--start S] [--jobs J] [--seed S] [--replay FILE]
                  [--shrink] [--policy native|pct] [--nodes N] [--check-determinism]
                  [--mutants] [--json] [--mutant NAME] [--corpus] [--trace] [--out FILE]

Exit status 0 when no invariant was violated (with --mutants: when every mutant
was caught), 1 otherwise. With --json the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sim import coverage, determinism, replay
from sim.choices import Choices
from sim.explore import explore, random_seeds
from sim.mutants import MUTANTS
from sim.run import RunResult, can_cancel, default_dialects, run_choices
from sim.scenario import DEFAULT, SCENARIOS, Scenario, scenario_for
from sim.schedule import POLICIES, Policy
from sim.shrink import shrink, strip
from sim.sweep import (
    KEY_COVERAGE,
    SeedOutcome,
    SweepReport,
    hunt_mutants,
    mutant_context,
    run_one,
    sweep,
)

MUTANT_LIMIT = 20


def repro(
    seed: int | None,
    policy: str,
    mutant: str | None,
    file: Path | None = None,
    nodes: int | None = None,
    scenario: str | None = None,
) -> str:
    target = f"--replay {file}" if file is not None else f"--seed {seed}"
    line = f"python -m sim {target}"
    if policy != "native" and file is None:
        line += f" --policy {policy}"
    own = MUTANTS[mutant].scenario if mutant else None
    if scenario is not None and scenario != (own or DEFAULT.name) and file is None:
        line += f" --scenario {scenario}"
    if nodes is not None and nodes != scenario_for(None, scenario or own or DEFAULT.name).nodes:
        if file is None:
            line += f" --nodes {nodes}"
    if mutant and file is None:
        line += f" --mutant {mutant}"
    return line


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="how many seeds (default 200; per mutant 20; --check-determinism 10)",
    )
    p.add_argument("--start", type=int, default=1, help="first seed (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--seed", type=int, help="run one seed (with --shrink: shrink its failure)")
    p.add_argument("--replay", type=Path, help="run a recorded choice list")
    p.add_argument("--shrink", action="store_true", help="shrink the failure of --seed/--replay")
    p.add_argument("--shrink-budget", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--out", type=Path, help="where --shrink writes the replay file")
    p.add_argument("--policy", choices=POLICIES, default="native")
    p.add_argument(
        "--nodes",
        type=int,
        default=None,
        help=f"nodes in the cluster (default: the scenario's; {DEFAULT.nodes} by default)",
    )
    p.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default=None,
        help="a named scenario (default: default; --mutant(s): each mutant's own)",
    )
    p.add_argument("--check-determinism", action="store_true")
    p.add_argument(
        "--explore",
        action="store_true",
        help="guided exploration (with --mutant: until caught), against fresh seeds",
    )
    p.add_argument(
        "--seconds", type=float, default=60.0, help="CPU seconds for --explore (default 60)"
    )
    p.add_argument("--mutants", action="store_true", help="every mutant must be caught")
    p.add_argument("--mutant", choices=sorted(MUTANTS), help="run with this bug applied")
    p.add_argument("--corpus", action="store_true", help="replay the regression corpus")
    p.add_argument("--trace", action="store_true", help="print the trace of --seed/--replay")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument(
        "--coverage", action="store_true", help="print every coverage counter of the sweep"
    )
    p.add_argument("--digests", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seeds-list", type=str, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def emit(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.digests:
        return cmd_digests(args)
    if args.mutants:
        return cmd_mutants(args)
    if args.explore:
        return cmd_explore(args)
    if args.check_determinism:
        return cmd_determinism(args)
    if args.corpus:
        return cmd_corpus(args)
    if args.replay is not None or args.seed is not None:
        return cmd_single(args)
    return cmd_sweep(args)


# ---- sweep ----


def cmd_sweep(args: argparse.Namespace) -> int:
    count = args.seeds if args.seeds is not None else 200
    seeds = range(args.start, args.start + count)

    def show(o: SeedOutcome) -> None:
        if not o.ok:
            print(f"seed {o.seed}: FAIL {o.violations[0]}"[:400])
            for extra in o.violations[1:4]:
                print(f"    also: {extra}"[:400])
            where = repro(o.seed, args.policy, args.mutant, None, args.nodes, args.scenario)
            print(f"    reproduce: {where}")

    report = sweep(
        seeds,
        policy=args.policy,
        mutant=args.mutant,
        jobs=args.jobs,
        on_outcome=show,
        nodes=args.nodes,
        scenario=args.scenario,
    )
    own = MUTANTS[args.mutant].scenario if args.mutant else None
    chosen = scenario_for(args.nodes, args.scenario or own or DEFAULT.name)
    ok = report.ok
    print(
        f"{report.seeds} seeds, {len(report.failures)} failing, "
        f"{report.seeds_per_s:.1f} seeds/s ({report.seeds_per_s_per_core:.1f}/s per core, "
        f"{args.jobs} job{'s' if args.jobs != 1 else ''}, policy {args.policy}, "
        f"scenario {chosen.name}, {chosen.nodes} node{'s' if chosen.nodes != 1 else ''})"
    )
    if args.coverage:
        print_coverage(report, chosen)
    else:
        keys = ", ".join(f"{k}={report.coverage.get(k, 0)}" for k in KEY_COVERAGE)
        print(f"coverage: {keys} (--coverage: every counter)")
    print_full_coverage(report, chosen)
    print_errors(report)
    for key in report.missing_coverage:
        print(f"COVERAGE: {key} never happened in {report.seeds} seeds")
    emit(
        args,
        {
            "seeds": report.seeds,
            "violations": sum(len(f.violations) for f in report.failures),
            "failing_seeds": len(report.failures),
            "seeds_per_s": round(report.seeds_per_s, 2),
            "seeds_per_s_per_core": round(report.seeds_per_s_per_core, 2),
            "failures": [
                {
                    "seed": f.seed,
                    "kinds": f.kinds,
                    "violation": f.violations[0],
                    "reproduce": repro(
                        f.seed, args.policy, args.mutant, None, args.nodes, args.scenario
                    ),
                }
                for f in report.failures
            ],
            "coverage": dict(sorted(report.coverage.items())),
            "missing_coverage": report.missing_coverage,
            "first_seen": report.first_seen,
            "full_coverage": report.full_coverage,
            "errors": dict(sorted(report.errors.items())),
            "explained": dict(sorted(report.explained.items())),
            "policy": args.policy,
            "nodes": chosen.nodes,
            "scenario": chosen.name,
        },
    )
    return 0 if ok else 1


def print_coverage(report: SweepReport, chosen: Scenario) -> None:
    """The catalogue: each counter's total, and the seed and CPU time by which it
    was first non-zero (seed order)."""
    print(f"{'counter':<42} {'count':>8} {'first seed':>10} {'CPU s':>8}")
    for path in coverage.COUNTERS:
        if not path.needs(chosen):
            continue
        first = report.first_seen.get(path.name)
        when = f"{first[0]:>10} {first[1]:>8.1f}" if first else f"{'-':>10} {'-':>8}"
        print(f"{path.name:<42} {report.coverage.get(path.name, 0):>8} {when}")


def print_full_coverage(report: SweepReport, chosen: Scenario) -> None:
    names = coverage.required(chosen)
    if report.full_coverage is None:
        print(f"{len(report.first_seen)}/{len(names)} coverage counters non-zero")
        return
    seeds, cpu = report.full_coverage
    print(
        f"all {len(names)} coverage counters non-zero after {seeds} seeds, "
        f"{cpu:.1f} s of CPU (seed order)"
    )


def print_errors(report: SweepReport) -> None:
    """How often each kind of error clients got was explained, and by what."""
    if not report.errors:
        return
    parts = []
    for kind, count in sorted(report.errors.items()):
        by = {k.split(" by ", 1)[1]: n for k, n in report.explained.items() if k.startswith(kind)}
        explained = sum(by.values())
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(by.items(), key=lambda x: -x[1]))
        parts.append(f"{kind} {explained}/{count} explained ({causes})")
    print("errors: " + "; ".join(parts))


# ---- one seed or one replay file ----


def cmd_single(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.replay is not None:
        recorded = replay.load(args.replay)
        policy: Policy = recorded.policy  # type: ignore[assignment]
        mutant = args.mutant or recorded.mutant
        with mutant_context(mutant):
            result = run_choices(
                Choices(replay=recorded.choices),
                policy=policy,
                dialects=recorded.dialects or None,
                keep_lines=args.trace,
                nodes=recorded.nodes,
                scenario=recorded.scenario,
            )
        where = repro(None, policy, mutant, args.replay)
        if recorded.digest and recorded.digest != result.digest:
            print(f"note: digest {result.digest} differs from the recorded {recorded.digest}")
    else:
        policy, mutant = args.policy, args.mutant
        own = MUTANTS[mutant].scenario if mutant else None
        scenario = args.scenario or own or DEFAULT.name
        with mutant_context(mutant):
            result = run_choices(
                Choices(seed=args.seed),
                policy=policy,
                seed=args.seed,
                keep_lines=args.trace,
                nodes=args.nodes,
                scenario=scenario,
            )
        where = repro(args.seed, policy, mutant, None, args.nodes, scenario)
    if args.trace and result.lines is not None:
        print("\n".join(result.lines))
    for violation in result.violations:
        print(f"FAIL {violation}")
    print(
        f"digest {result.digest}, {len(result.choices)} choices, "
        f"{len(result.violations)} violations ({where})"
    )
    shrunk: dict[str, Any] = {}
    if args.shrink and result.violations:
        shrunk = do_shrink(args, result, policy, mutant)
    elif args.shrink:
        print("nothing to shrink: the run passes")
    emit(
        args,
        {
            "seeds": 1,
            "violations": len(result.violations),
            "seeds_per_s": round(1 / (time.perf_counter() - started), 2),
            "digest": result.digest,
            "kinds": sorted(result.kinds),
            "reproduce": where,
            **shrunk,
        },
    )
    return 0 if result.ok else 1


def do_shrink(
    args: argparse.Namespace, result: RunResult, policy: Policy, mutant: str | None
) -> dict[str, Any]:
    kind = result.violations[0].kind
    length = len(result.choices)

    def run(candidate: list[int]) -> RunResult:
        with mutant_context(mutant):
            return run_choices(
                Choices(replay=candidate),
                policy=policy,
                dialects=result.dialects,
                nodes=result.nodes,
                scenario=result.scenario,
            )

    print(f"shrinking {length} choices (violation kind {kind}, {args.shrink_budget:.0f}s budget)")
    report = shrink(result, run, kind, budget=args.shrink_budget)
    best = report.result
    name = f"{mutant or 'bug'}-{kind}-{result.seed if result.seed is not None else best.digest[:8]}"
    path = args.out or replay.CORPUS / f"{name}.json"
    replay.Replay(
        choices=strip(best.choices),
        policy=policy,
        dialects=best.dialects,
        mutant=mutant,
        # Without a mutant: a bug just found, not fixed yet (the fix flips it to pass).
        expect="fail",
        violation=kind,
        digest=best.digest,
        seed=result.seed,
        note=str(best.violations[0])[:300],
        nodes=result.nodes,
        scenario=result.scenario,
    ).save(path)
    print(
        f"shrunk {length} -> {len(report.choices)} choices in {report.attempts} runs; "
        f"it still fails with: {best.violations[0]}"[:500]
    )
    print(f"wrote {path}; reproduce: {repro(None, policy, mutant, path)}")
    return {"shrunk_choices": len(report.choices), "shrunk_file": str(path)}


# ---- mutants ----


def cmd_mutants(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    names = [args.mutant] if args.mutant else sorted(n for n, m in MUTANTS.items() if m.hunt)
    limit = args.seeds if args.seeds is not None else MUTANT_LIMIT
    reports = hunt_mutants(
        names,
        start=args.start,
        limit=limit,
        policy=args.policy,
        jobs=args.jobs,
        nodes=args.nodes,
        scenario=args.scenario,
    )
    seeds = sum(r.seeds_to_catch for r in reports)
    wall = time.perf_counter() - started
    for r in reports:
        if r.caught and r.explored_cpu is not None:
            print(
                f"mutant {r.name}: caught by exploration after {r.seeds_to_catch} run(s), "
                f"{r.explored_cpu:.1f} s of CPU ({r.bug})"
            )
            print(f"    {r.violation}"[:300])
            if r.choices is not None:
                path = save_found(r.name, r.choices, args)
                print(f"    reproduce: {repro(None, args.policy, r.name, path)}")
        elif r.caught:
            print(f"mutant {r.name}: caught after {r.seeds_to_catch} seed(s) ({r.bug})")
            print(f"    {r.violation}"[:300])
            where = repro(r.seed, args.policy, r.name, None, args.nodes, args.scenario)
            print(f"    reproduce: {where}")
        elif r.explored_cpu is not None:
            print(f"mutant {r.name}: NOT CAUGHT in {r.explored_cpu:.0f} s of exploration ({r.bug})")
        else:
            print(f"mutant {r.name}: NOT CAUGHT in {limit} seeds ({r.bug})")
    caught = all(r.caught for r in reports)
    print(f"{sum(r.caught for r in reports)}/{len(reports)} mutants caught, {seeds} seeds run")
    emit(
        args,
        {
            "seeds": seeds,
            "violations": sum(r.caught for r in reports),
            "seeds_per_s": round(seeds / wall, 2),
            "mutants": {
                r.name: {"caught": r.caught, "seeds_to_catch": r.seeds_to_catch, "seed": r.seed}
                for r in reports
            },
        },
    )
    return 0 if caught else 1


def save_found(
    mutant: str | None, choices: list[int], args: argparse.Namespace, kind: str = ""
) -> Path:
    """A run exploration found, as a replay file in sim-found/ (or --out)."""
    own = MUTANTS[mutant].scenario if mutant else None
    chosen = scenario_for(args.nodes, args.scenario or own or DEFAULT.name)
    path = args.out or Path("sim-found") / f"{mutant or 'found'}{'-' + kind if kind else ''}.json"
    replay.Replay(
        choices=strip(choices),
        policy=args.policy,
        dialects=default_dialects(),
        mutant=mutant,
        expect="fail",
        nodes=chosen.nodes,
        scenario=chosen.name,
    ).save(path)
    return path


# ---- guided exploration ----


def cmd_explore(args: argparse.Namespace) -> int:
    """With --mutant: explore until the mutant is caught. Without: fresh seeds for
    --seconds, then exploration for as long, and when each reached the rarest
    counters."""
    own = MUTANTS[args.mutant].scenario if args.mutant else None
    chosen = scenario_for(args.nodes, args.scenario or own or DEFAULT.name)
    dialects = default_dialects()
    if args.mutant:
        with mutant_context(args.mutant):
            state = explore(
                args.seconds,
                scenario=chosen,
                dialects=dialects,
                can_cancel=can_cancel(),
                policy=args.policy,
                start=args.start,
                stop_at_failure=True,
            )
        found = state.failure
        if found is None:
            print(
                f"mutant {args.mutant}: NOT CAUGHT in {state.runs} runs, {state.cpu:.1f} s of CPU"
            )
        else:
            path = save_found(args.mutant, list(found.choices), args)
            print(
                f"mutant {args.mutant}: caught after {state.runs} runs, {state.cpu:.1f} s of "
                f"CPU: {found.violations[0]}"[:400]
            )
            print(f"    reproduce: {repro(None, args.policy, args.mutant, path)}")
        emit(args, {"runs": state.runs, "cpu": round(state.cpu, 2), "caught": found is not None})
        return 0 if found is not None else 1
    fresh = random_seeds(
        args.seconds, scenario=chosen, dialects=dialects, policy=args.policy, start=args.start
    )
    guided = explore(
        args.seconds,
        scenario=chosen,
        dialects=dialects,
        can_cancel=can_cancel(),
        policy=args.policy,
        start=args.start,
    )
    names = coverage.required(chosen)
    rarest = sorted(names, key=lambda n: (fresh.totals.get(n, 0), n))[:15]
    print(
        f"fresh seeds: {fresh.runs} runs, {fresh.cpu:.1f} s; exploration: {guided.runs} runs, "
        f"{guided.cpu:.1f} s, corpus {len(guided.corpus)}"
    )
    head = ("rarest counters", "seeds: count", "first run", "explored", "first run")
    print(f"{head[0]:<42} {head[1]:>12} {head[2]:>9} {head[3]:>9} {head[4]:>9}")
    for name in rarest:
        a, b = fresh.first_reached.get(name), guided.first_reached.get(name)
        print(
            f"{name:<42} {fresh.totals.get(name, 0):>12} {a if a else '-':>9} "
            f"{guided.totals.get(name, 0):>9} {b if b else '-':>9}"
        )
    for state, how in ((fresh, "seeds"), (guided, "exploration")):
        for result in state.failures[:3]:
            path = save_found(
                None, list(result.choices), args, f"{how}-{result.violations[0].kind}"
            )
            print(f"FAIL ({how}) {result.violations[0]}"[:300])
            print(f"    reproduce: {repro(None, args.policy, None, path)}")
    failures = len(fresh.failures) + len(guided.failures)
    emit(
        args,
        {
            "seeds": fresh.runs + guided.runs,
            "violations": failures,
            "first_reached_seeds": fresh.first_reached,
            "first_reached_explored": guided.first_reached,
        },
    )
    return 0 if not failures else 1


# ---- determinism ----


def cmd_determinism(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    count = args.seeds if args.seeds is not None else 10
    seeds = list(range(args.start, args.start + count))
    problems = determinism.check(seeds, args.policy, args.nodes, args.scenario)
    for line in problems:
        print(f"NONDETERMINISTIC {line}")
    print(
        f"{len(seeds)} seeds: {'deterministic' if not problems else 'NOT deterministic'} "
        "(in-process rerun, fresh process with another PYTHONHASHSEED)"
    )
    emit(
        args,
        {
            "seeds": len(seeds),
            "violations": len(problems),
            "seeds_per_s": round(3 * len(seeds) / (time.perf_counter() - started), 2),
            "deterministic": not problems,
        },
    )
    return 0 if not problems else 1


def cmd_digests(args: argparse.Namespace) -> int:
    seeds = [int(s) for s in (args.seeds_list or "").split(",") if s]
    found = {
        seed: run_one(seed, args.policy, None, args.nodes, args.scenario).digest for seed in seeds
    }
    print(json.dumps({"digests": found}))
    return 0


# ---- regression corpus ----


def cmd_corpus(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    failures = 0
    files = replay.corpus_files()
    for path in files:
        for problem in check_corpus_entry(path):
            failures += 1
            print(f"CORPUS {path.name}: {problem}")
            print(f"    reproduce: {repro(None, 'native', None, path)}")
    print(f"{len(files)} corpus entries, {failures} problems")
    emit(
        args,
        {
            "seeds": len(files),
            "violations": failures,
            "seeds_per_s": round(len(files) / (time.perf_counter() - started), 2),
        },
    )
    return 0 if not failures else 1


def check_corpus_entry(path: Path) -> list[str]:
    """What is wrong with one corpus entry: a "pass" entry must pass; a "fail"
    entry must still fail with its violation under its mutant, and pass without."""
    entry = replay.load(path)
    policy: Policy = entry.policy  # type: ignore[assignment]

    def run(mutant: str | None) -> RunResult:
        with mutant_context(mutant):
            return run_choices(
                Choices(replay=entry.choices),
                policy=policy,
                dialects=entry.dialects or None,
                nodes=entry.nodes,
                scenario=entry.scenario,
            )

    problems = []
    healthy = run(None)
    if entry.expect == "fail" and entry.mutant is None:
        # A bug found and not fixed yet: it must still be there.
        if entry.violation not in healthy.kinds:
            problems.append(
                f"no longer fails with {entry.violation} (fixed? then expect pass): "
                f"{sorted(healthy.kinds) or 'no violation'}"
            )
        return problems
    if healthy.violations:
        problems.append(f"fails without any mutant: {healthy.violations[0]}")
    if entry.expect == "fail":
        broken = run(entry.mutant)
        if entry.violation not in broken.kinds:
            problems.append(
                f"mutant {entry.mutant} is no longer caught as {entry.violation} "
                f"(got {sorted(broken.kinds) or 'no violation'})"
            )
    return problems


if __name__ == "__main__":
    sys.exit(main())
