"""The load and fault harness: real node processes on loopback, hostile clients.

    python -m bench.load [--scenarios storm,malformed,slow,kill,link,nodekill] [--clients 400]
                         [--vanish 0.5] [--seed 1] [--max-batch 32] [--json FILE]

Run by hand (minutes, not seconds); not part of the test suite. Everything is on
127.0.0.1, bounded in count and time. One node serves the demo model; its
requests are greedy with EOS banned, so every completed stream can be compared with
the text the same prompt gives alone (taken before the load starts).

Scenarios (each prints a row of the final table):
- storm: hundreds of concurrent requests across every dialect, streaming or not; a
  random half of the clients vanish (half a request head sent; the request sent and
  no answer read; half a body sent; after k chunks; while a non-streaming answer is
  made), with a FIN or a RST. Afterwards every completed stream must be exact, the
  in-flight and open-stream gauges and the runner's active requests must be back to
  zero, and the node's memory and open files back at their baseline.
- malformed: malformed and oversized requests mixed into a run of good streams:
  every one must get a 4xx, and every good stream must still be exact.
- slow: clients with a tiny receive buffer stop reading (and do not close) early in
  long streams, while other clients stream normally: the others must not slow down,
  and the node must end the stalled streams (its send timeout) and free their work.
- kill: clients stream in a loop while the runner process is SIGKILLed at random
  moments: every request in flight gets an error terminal (the time from the kill
  to each client's error event is reported), the runner restarts, the node serves
  exact streams again without any manual step.

- link, nodekill (bench/load_cluster.py): small clusters of their own; a link cut
  and healed under load, and the node holding the model SIGKILLed, restarted and
  given the model again under load, with the same accounting.

A new scenario is a function returning a Report (bench/loadharness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from bench import load_cluster, probe
from bench.loadclient import (
    DIALECTS,
    Outcome,
    Plan,
    random_plan,
    request_body,
    run_client,
)
from bench.loadharness import PROMPTS, Harness, Report, account_faults, run_loop
from exo_trio.demo_model import build_demo_model
from exo_trio.prompts import HFPromptEncoder
from fuzz.http1 import build_request
from tests.nodeproc import start_node

# ---- scenarios ----


def storm(h: Harness, args: argparse.Namespace) -> Report:
    report = Report("storm")
    h.measure_before(report)
    plans = [random_plan(i, h.rng, PROMPTS, args.vanish) for i in range(args.clients)]
    started = time.monotonic()
    outcomes = h.run(plans, ramp=args.ramp)
    report.seconds = time.monotonic() - started
    h.account(report, outcomes)
    where = Counter(p.vanish for p in plans if p.vanish)
    report.notes.append("vanished " + ", ".join(f"{k} {v}" for k, v in sorted(where.items())))
    h.measure_after(report)
    return report


def malformed_requests(eos: list[int]) -> list[tuple[str, bytes]]:
    good = request_body(Plan(0, "chat", False, "hi", 8), eos)
    path = "/v1/chat/completions"
    ct = [("Content-Type", "application/json")]

    def post(body: bytes, p: str = path, headers: list[tuple[str, str]] = ct) -> bytes:
        return build_request("POST", p, headers, body)

    def with_(**changes: Any) -> bytes:
        return post(json.dumps({**good, **changes}).encode())

    return [
        ("truncated json", post(b'{"model": "demo", "messages": [')),
        ("not json", post(b"hello")),
        ("invalid utf-8", post(b'{"model": "\xff\xfe", "messages": []}')),
        (
            "deep nesting",
            post(b'{"model":"demo","messages":[],"user":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ),
        ("seed beyond 64 bits", with_(seed=2**64)),
        ("wrong type", with_(max_tokens="many")),
        ("unknown model", with_(model="nope")),
        ("context overflow", with_(max_tokens=10**6)),
        ("too many stops", with_(stop=["a", "b", "c", "d", "e"])),
        ("image part", with_(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
        ("oversized body", post(b'{"x": "' + b"a" * (5 * 1024 * 1024) + b'"}')),
        ("wrong method", build_request("GET", path)),
        ("unknown route", post(b"{}", "/v1/nothing")),
        ("anthropic no max_tokens", post(b'{"model":"demo","messages":[]}', "/v1/messages")),
        (
            "ollama bad options",
            post(b'{"model":"demo","options":{"num_predict":"x"}}', "/api/generate"),
        ),
        ("huge header", build_request("POST", path, [*ct, ("X-Big", "a" * 70000)], b"{}")),
        (
            "bad content-length",
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: -5\r\nConnection: close\r\n\r\n",
        ),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n"),
    ]


async def send_raw(port: int, raw: bytes) -> int:
    """Send bytes, read the answer's status (0 if the connection closed first)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        try:
            await stream.send_all(raw)
        except trio.BrokenResourceError:
            pass  # refused before all of an oversized body was sent: read the answer
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        parts = data.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    finally:
        await trio.aclose_forcefully(stream)


def malformed(h: Harness, args: argparse.Namespace) -> Report:
    report = Report("malformed")
    h.measure_before(report)
    bad = malformed_requests(h.eos) * args.malformed_repeat
    plans = [random_plan(i, h.rng, PROMPTS, 0.0) for i in range(args.clients // 4)]
    statuses: list[tuple[str, int]] = []

    async def hostile() -> None:
        for name, raw in h.rng.sample(bad, len(bad)):
            statuses.append((name, await send_raw(h.node.port, raw)))
            await trio.sleep(0.01)

    started = time.monotonic()
    outcomes: list[Outcome] = []

    def run_good() -> None:
        outcomes.extend(h.run(plans, ramp=args.ramp))

    async def both() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, run_good)
            nursery.start_soon(hostile)

    trio.run(both)
    report.seconds = time.monotonic() - started
    h.account(report, outcomes)
    not_4xx = [(name, status) for name, status in statuses if not 400 <= status < 500]
    by_status = Counter(status for _, status in statuses)
    report.notes.append(
        f"{len(statuses)} malformed: statuses {dict(sorted(by_status.items()))}; "
        f"not 4xx: {not_4xx or 'none'}"
    )
    report.errors.update(f"malformed_not_4xx:{n}" for n, _ in not_4xx)
    h.measure_after(report)
    return report


def slow(h: Harness, args: argparse.Namespace) -> Report:
    report = Report("slow")
    h.measure_before(report)
    good = [Plan(i, "chat", True, *PROMPTS[i % len(PROMPTS)]) for i in range(args.slow_good)]
    started = time.monotonic()
    baseline = h.run(good, ramp=0.2)
    baseline_s = time.monotonic() - started
    long_prompt = "Tell me a very long story."
    stalled = [
        Plan(1000 + i, "chat", True, long_prompt, args.slow_tokens, recv_buffer=2048, stall_after=1)
        for i in range(args.slow_readers)
    ]
    h.references.setdefault(("chat", long_prompt), [])
    outcomes = [Outcome(p) for p in stalled]
    rss_peak = 0
    cut_after: float | None = None
    beside_slow = 0.0

    async def main() -> None:
        nonlocal rss_peak, cut_after, beside_slow
        async with trio.open_nursery() as nursery:
            for outcome in outcomes:
                nursery.start_soon(run_client, h.node.port, outcome.plan, h.eos, outcome)
        stall_at = time.monotonic()
        good_started = time.monotonic()
        with_slow = await trio.to_thread.run_sync(h.run, good, 0.2)
        beside_slow = time.monotonic() - good_started
        h.account(report, [*baseline, *with_slow])
        # Wait for the node to give up on the stalled streams.
        while time.monotonic() - stall_at < args.send_timeout + 30:
            rss_peak = max(rss_peak, probe.rss_kb(h.pid))
            if probe.leftovers(h.url).clean:
                cut_after = time.monotonic() - stall_at
                break
            await trio.sleep(0.1)
        cut = 0
        for outcome in outcomes:
            if outcome.held is not None:
                # Drain what the kernel holds: a cut stream ends without its terminal.
                stream = outcome.held
                data = b""
                with trio.move_on_after(5):
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                cut += b"0\r\n\r\n" not in data[-16:]
                await trio.aclose_forcefully(stream)
        report.notes.append(
            f"{cut} of {len(stalled)} stalled streams were cut by the node "
            f"(the rest completed into socket buffers); node quiet "
            f"{cut_after if cut_after is None else round(cut_after, 1)}s after the stall; "
            f"RSS peak {rss_peak} kB"
        )

    trio.run(main)
    report.sent += len(stalled)
    # Control: the same normal streams beside as many long streams that do read.
    # The stalled ones cost what any sequence in the batch costs until the node cuts
    # them; the control tells that compute share from any stall of the node itself.
    probe.wait_quiet(h.url)
    readers = [Outcome(p) for p in stalled]
    for outcome in readers:
        outcome.plan = Plan(outcome.plan.index, "chat", True, long_prompt, args.slow_tokens)

    async def control() -> float:
        async with trio.open_nursery() as nursery:
            for outcome in readers:
                nursery.start_soon(run_client, h.node.port, outcome.plan, h.eos, outcome)
            await trio.sleep(0.5)
            began = time.monotonic()
            await trio.to_thread.run_sync(h.run, good, 0.2)
            took = time.monotonic() - began
            nursery.cancel_scope.cancel()  # the long readers are not needed any more
        return took

    beside_readers = trio.run(control)
    report.notes.insert(
        0,
        f"{len(good)} normal streams took {baseline_s:.2f}s alone, {beside_slow:.2f}s "
        f"beside {len(stalled)} stalled readers, {beside_readers:.2f}s beside "
        f"{len(stalled)} long streams that read",
    )
    report.seconds = time.monotonic() - started
    h.measure_after(report)
    return report


def kill(h: Harness, args: argparse.Namespace) -> Report:
    report = Report("kill")
    h.measure_before(report)
    restarts: list[float] = []

    async def killer(faults: list[float]) -> None:
        for _ in range(args.kills):
            # Long enough healthy spells for requests to complete between kills.
            await trio.sleep(h.rng.uniform(4.0, 8.0))
            _, health = await trio.to_thread.run_sync(probe.health, h.url)
            runner = health.get("runner") or {}
            pid = runner.get("pid") if isinstance(runner, dict) else None
            if not pid:
                continue
            faults.append(time.monotonic())
            os.kill(int(pid), signal.SIGKILL)
            while not await trio.to_thread.run_sync(serving_again, h.url, int(pid)):
                await trio.sleep(0.05)
            restarts.append(time.monotonic() - faults[-1])

    started = time.monotonic()
    outcomes, kills = run_loop(h, args.kill_clients, args.kill_seconds, killer, DIALECTS)
    report.seconds = time.monotonic() - started
    h.account(report, outcomes)
    affected = account_faults(report, outcomes, kills)
    report.notes.append(
        f"{len(kills)} runner kills, {affected} requests in flight failed by them; runner "
        "back in " + ", ".join(f"{r:.1f}s" for r in restarts)
    )
    check_serving(h, report, "after the kills")
    h.measure_after(report)
    return report


def serving_again(url: str, killed: int) -> bool:
    """Healthy, with a new runner (right after a kill the old one may still look up)."""
    status, health = probe.health(url)
    runner = health.get("runner")
    return status == 200 and isinstance(runner, dict) and runner.get("pid") != killed


def check_serving(h: Harness, report: Report, when: str) -> None:
    """The node serves again, exactly, in every dialect, without a manual step."""
    after = h.run([Plan(0, d, True, *PROMPTS[0]) for d in DIALECTS], ramp=0.1)
    fresh = Report("after")
    h.account(fresh, after)
    report.notes.append(f"{when}: {fresh.exact}/{len(after)} dialects exact")


SCENARIOS: dict[str, Callable[[Harness, argparse.Namespace], Report]] = {
    "storm": storm,
    "malformed": malformed,
    "slow": slow,
    "kill": kill,
}


def table(reports: list[Report]) -> str:
    head = (
        f"{'scenario':10} {'secs':>5} {'sent':>5} {'exact':>5} {'inexact':>7} {'vanished':>8} "
        f"{'lost':>4} {'leaked':>6} {'RSS before':>10} {'after':>8} {'fds':>7} "
        f"{'fault->error s (max/p50)':>24}  errors"
    )
    rows = [head, "-" * len(head)]
    for r in reports:
        leaked = int(sum(r.leaked.values()))
        faults = (
            f"{max(r.fault_to_error_s):.3f}/{statistics.median(r.fault_to_error_s):.3f}"
            if r.fault_to_error_s
            else "-"
        )
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "-"
        rows.append(
            f"{r.scenario:10} {r.seconds:>5.0f} {r.sent:>5} {r.exact:>5} {r.inexact:>7} "
            f"{r.vanished:>8} {r.chunks_lost:>4} {leaked:>6} {r.rss_before_kb:>7} kB "
            f"{r.rss_after_kb:>5} kB {r.fds_before:>3}/{r.fds_after:<3} {faults:>24}  {errors}"
        )
    for r in reports:
        for note in r.notes[:12]:
            rows.append(f"  {r.scenario}: {note}")
    return "\n".join(rows)


CLUSTER_SCENARIOS: dict[str, Callable[[argparse.Namespace, Path, Path, list[int]], Report]] = {
    "link": load_cluster.link,
    "nodekill": load_cluster.nodekill,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="storm,malformed,slow,kill,link,nodekill")
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--vanish", type=float, default=0.5)
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds to start the clients")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--send-timeout", type=float, default=5.0)
    parser.add_argument("--malformed-repeat", type=int, default=4)
    parser.add_argument("--slow-readers", type=int, default=8)
    parser.add_argument("--slow-good", type=int, default=32)
    parser.add_argument("--slow-tokens", type=int, default=1800)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--kill-clients", type=int, default=24)
    parser.add_argument("--kill-seconds", type=float, default=45.0)
    parser.add_argument("--cluster-clients", type=int, default=16)
    parser.add_argument("--cluster-seconds", type=float, default=25.0)
    parser.add_argument("--cuts", type=int, default=3)
    parser.add_argument("--cut-for", type=float, default=2.0)
    parser.add_argument("--node-kills", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args()
    names = args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS and n not in CLUSTER_SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}")

    root = Path(tempfile.mkdtemp(prefix="exo-trio-load-"))
    model = build_demo_model(root / "models" / "demo")
    eos = HFPromptEncoder(model).eos_token_ids
    reports: list[Report] = []
    single = [n for n in names if n in SCENARIOS]
    if single:
        node = start_node(
            model,
            root / "node",
            "--max-batch",
            str(args.max_batch),
            "--max-queued",
            "4096",
            "--send-timeout",
            str(args.send_timeout),
            "--keepalive",
            "1",
            "--no-discovery",
        )
        try:
            node.wait_healthy()
            h = Harness(node, eos, random.Random(args.seed))
            h.take_references()
            # Warm the node (allocator pools, code paths) before its baseline is taken.
            h.run(
                [random_plan(i, h.rng, PROMPTS, args.vanish) for i in range(args.clients)],
                ramp=args.ramp,
            )
            probe.wait_quiet(node.base_url)
            for name in single:
                print(f"running {name} ...", flush=True)
                reports.append(SCENARIOS[name](h, args))
                print(table(reports[-1:]), flush=True)
        finally:
            node.stop()
            print(f"node log: {node.log_path}")
    for name in names:
        if name in CLUSTER_SCENARIOS:
            print(f"running {name} ...", flush=True)
            reports.append(CLUSTER_SCENARIOS[name](args, model, root, eos))
            print(table(reports[-1:]), flush=True)
    print()
    print(table(reports))
    if args.json:
        rows = [{**asdict(r), "errors": dict(r.errors)} for r in reports]
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
