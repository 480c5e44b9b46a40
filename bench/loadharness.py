"""What every load scenario shares: the prompts, the report row, and a harness
around one node that takes reference texts, runs clients and accounts for them."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from bench import probe
from bench.loadclient import Outcome, Plan, run_client
from tests.nodeproc import NodeProcess

PROMPTS = [
    ("Tell me about trio nurseries.", 24),
    ("Why do structured concurrency and cancellation go together?", 32),
    ("hi", 16),
    ("Write a haiku about sockets.", 20),
    ("List three prime numbers and explain why they are prime.", 40),
    ("What is a continuous batch?", 28),
    ("Summarise the design of exo-trio in one sentence.", 36),
    ("Count from one to ten.", 12),
]
CLIENT_LIMIT = 180.0  # seconds any one client may take before it counts as hung


@dataclass
class Report:
    scenario: str
    sent: int = 0
    exact: int = 0
    inexact: int = 0
    vanished: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # asdict cannot copy a Counter
    chunks_lost: int = 0
    leaked: dict[str, float] = field(default_factory=dict)
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    fds_before: int = 0
    fds_after: int = 0
    tasks_before: int | None = None  # live Trio tasks in the node (its /health)
    tasks_after: int | None = None
    fault_to_error_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class Harness:
    def __init__(self, node: NodeProcess, eos: list[int], rng: random.Random) -> None:
        self.node = node
        self.eos = eos
        self.rng = rng
        self.references: dict[tuple[str, str], list[str]] = {}

    @property
    def url(self) -> str:
        return self.node.base_url

    @property
    def pid(self) -> int:
        return self.node.process.pid

    # ---- references ----

    def take_references(self) -> None:
        """The greedy text of every prompt, each request alone on the node."""
        for prompt, max_tokens in PROMPTS:
            for group, dialect in (("chat", "chat"), ("raw", "completions")):
                plan = Plan(-1, dialect, True, prompt, max_tokens)
                outcome = Outcome(plan)
                trio.run(run_client, self.node.port, plan, self.eos, outcome)
                assert outcome.kind == "done", (outcome.kind, outcome.detail)
                assert outcome.completion_tokens == max_tokens, outcome.completion_tokens
                self.references[(group, prompt)] = outcome.pieces

    def reference(self, plan: Plan) -> list[str]:
        group = "raw" if plan.dialect == "completions" else "chat"
        return self.references[(group, plan.prompt)]

    # ---- running clients ----

    def run(self, plans: list[Plan], ramp: float = 1.0) -> list[Outcome]:
        outcomes = [Outcome(p) for p in plans]

        async def one(outcome: Outcome) -> None:
            with trio.move_on_after(CLIENT_LIMIT) as scope:
                try:
                    await run_client(self.node.port, outcome.plan, self.eos, outcome)
                except OSError as exc:
                    outcome.kind, outcome.detail = "connect_failed", repr(exc)
            if scope.cancelled_caught:
                outcome.kind = "hung"

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                for outcome in outcomes:
                    nursery.start_soon(one, outcome)
                    await trio.sleep(ramp / max(1, len(outcomes)))

        trio.run(main)
        return outcomes

    def account(self, report: Report, outcomes: list[Outcome]) -> None:
        """Count outcomes: exact, inexact (with chunks lost), vanished, errors."""
        for outcome in outcomes:
            report.sent += 1
            if outcome.kind == "vanished":
                report.vanished += 1
            elif outcome.kind == "done":
                want = self.reference(outcome.plan)
                tokens_ok = outcome.completion_tokens in (None, outcome.plan.max_tokens)
                if outcome.text == "".join(want) and tokens_ok:
                    report.exact += 1
                else:
                    report.inexact += 1
                    if outcome.plan.stream:
                        report.chunks_lost += max(0, len(want) - len(outcome.pieces))
                    report.notes.append(
                        f"inexact {outcome.plan.dialect} #{outcome.plan.index}: "
                        f"{outcome.text[:60]!r} vs {''.join(want)[:60]!r}"
                    )
            else:
                report.errors[outcome.kind] += 1

    def measure_before(self, report: Report) -> None:
        report.rss_before_kb = probe.rss_kb(self.pid)
        report.fds_before = probe.open_fds(self.pid)
        report.tasks_before = tasks(self.url)

    def measure_after(self, report: Report) -> None:
        waited, left = probe.wait_quiet(self.url)
        report.leaked = {
            "in_flight": left.in_flight,
            "open_streams": left.open_streams,
            "runner_active": left.runner_active,
        }
        report.notes.append(f"quiet {waited:.2f}s after the last client")
        time.sleep(0.5)
        report.rss_after_kb = probe.rss_kb(self.pid)
        report.fds_after = probe.open_fds(self.pid)
        status, health = probe.health(self.url)
        runner = health.get("runner") or {}
        assert isinstance(runner, dict)
        report.notes.append(
            f"health {status}; runner max steps after a cancel: "
            f"{runner.get('max_steps_after_cancel')}; late events "
            f"{health.get('late_events')}, unknown events {health.get('unknown_events')}"
        )
        report.tasks_after = tasks(self.url)
        if report.tasks_before is not None and report.tasks_after is not None:
            if report.tasks_after > report.tasks_before:
                report.leaked["tasks"] = report.tasks_after - report.tasks_before
            report.notes.append(f"tasks {report.tasks_before} -> {report.tasks_after}")
        if health.get("unknown_events"):
            report.leaked["unknown_events"] = float(health["unknown_events"])  # type: ignore[arg-type]


def run_loop(
    h: Harness,
    clients: int,
    seconds: float,
    faulter: Callable[[list[float]], Awaitable[None]],
    dialects: tuple[str, ...],
) -> tuple[list[Outcome], list[float]]:
    """`clients` clients stream requests back to back for `seconds` while `faulter`
    injects faults, appending each fault's time (time.monotonic) to the list."""
    outcomes: list[Outcome] = []
    faults: list[float] = []
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop_at:
            prompt, n = h.rng.choice(PROMPTS)
            outcome = Outcome(Plan(len(outcomes), h.rng.choice(dialects), True, prompt, n))
            outcomes.append(outcome)
            with trio.move_on_after(CLIENT_LIMIT) as scope:
                try:
                    await run_client(h.node.port, outcome.plan, h.eos, outcome)
                except OSError as exc:
                    outcome.kind, outcome.detail = "connect_failed", repr(exc)
            if scope.cancelled_caught:
                outcome.kind = "hung"
            if outcome.kind.startswith(("http_5", "connect_failed")):
                await trio.sleep(0.2)  # nothing can serve right now: retry shortly

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
            await faulter(faults)

    trio.run(main)
    return outcomes, faults


def account_faults(report: Report, outcomes: list[Outcome], faults: list[float]) -> int:
    """Requests in flight at a fault: each must end with an error terminal. Records
    the time from the fault to each one's error event; returns how many there were."""
    affected = 0
    for at in faults:
        for outcome in outcomes:
            ended = outcome.ended or 0.0
            if not outcome.started < at <= ended:
                continue
            if outcome.kind.startswith("error:"):
                affected += 1
                report.fault_to_error_s.append(ended - at)
            elif outcome.kind == "done" and ended - at > 0.05:
                report.notes.append(
                    f"#{outcome.plan.index} was in flight at a fault and still finished"
                )
            elif outcome.kind not in ("done", "vanished"):
                report.errors[f"in_flight_at_fault:{outcome.kind}"] += 1
    return affected


def tasks(url: str) -> int | None:
    """The node's live Trio task count (None from a node that does not report it)."""
    value = probe.health(url)[1].get("tasks")
    return int(value) if isinstance(value, int) else None
