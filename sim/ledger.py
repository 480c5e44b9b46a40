"""The oracle: what the fake runners really did, per request.

The ledger observes every fake runner (it is their RunnerObserver): which commands
arrived, which chunks were put on the pipe and when, how each job ended. The
invariants compare what every client decoded against it. A job's tokens are
recorded only once the bytes carrying them were queued on the pipe, so "emitted"
means "the worker will read it", even if the runner dies right after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import trio

from exo_trio.types import ChunkGenerated, GenerationEvent, GenerationFinished, TextGeneration
from sim.encoder import client_of
from sim.fake_runner import FakeRunner
from sim.trace import Trace

# finished: its terminal event went out; cancelled: a Cancel reached the runner;
# stopped: the runner's input closed (shard stopped, node shutting down);
# died: its distributed group broke (rank 0 failed it); lost: the runner died with it.
JobEnd = Literal["finished", "cancelled", "lost", "stopped", "died"]


@dataclass
class RunnerJob:
    request_id: str
    client: int | None
    runner: int
    max_tokens: int
    started_at: float
    tokens: list[tuple[int, int]] = field(default_factory=list)  # (seq, token)
    texts: list[str] = field(default_factory=list)
    emit_times: list[float] = field(default_factory=list)
    first_emit_tick: int | None = None
    end: JobEnd | None = None
    end_at: float | None = None
    finish_reason: str | None = None

    def ended(self, how: JobEnd) -> None:
        if self.end is None:
            self.end = how
            self.end_at = trio.current_time()


class Ledger:
    def __init__(self, trace: Trace, on_step: Callable[[FakeRunner], None]) -> None:
        self.trace = trace
        self.on_step = on_step
        self.jobs: dict[str, RunnerJob] = {}
        self.by_client: dict[int, list[RunnerJob]] = {}
        self.steps = 0  # decode steps across all runners
        self.duplicate_starts: list[str] = []

    # ---- RunnerObserver ----

    def started(self, runner: FakeRunner, command: TextGeneration) -> None:
        rid = command.request_id
        client = client_of(command.prompt_tokens)
        self.trace.add("runner", runner.index, "start", rid, client)
        if rid in self.jobs:
            self.duplicate_starts.append(rid)
        job = RunnerJob(
            request_id=rid,
            client=client,
            runner=runner.index,
            max_tokens=command.params.max_tokens,
            started_at=trio.current_time(),
        )
        self.jobs[rid] = job
        if client is not None:
            self.by_client.setdefault(client, []).append(job)

    def sent(self, runner: FakeRunner, events: list[GenerationEvent]) -> None:
        self.steps += 1
        now = trio.current_time()
        tick = self.trace.add(
            "step", runner.index, runner.steps, len(events), *(_short(e) for e in events)
        )
        for event in events:
            job = self.jobs.get(event.request_id)
            if job is None:
                continue
            if isinstance(event, ChunkGenerated):
                job.tokens.append((event.seq, event.token))
                job.texts.append(event.text)
                job.emit_times.append(now)
                if job.first_emit_tick is None:
                    job.first_emit_tick = tick
            elif isinstance(event, GenerationFinished):
                job.finish_reason = event.finish_reason
                job.ended("finished")
        self.on_step(runner)

    def cancelled(self, runner: FakeRunner, request_id: str, known: bool) -> None:
        self.trace.add("runner", runner.index, "cancel", request_id, known)
        job = self.jobs.get(request_id)
        if job is not None and known:
            job.ended("cancelled")

    def stopped(self, runner: FakeRunner, request_ids: list[str]) -> None:
        self.trace.add("runner", runner.index, "stopped", *request_ids)
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                job.ended("stopped")

    def died(self, runner: FakeRunner, request_ids: list[str]) -> None:
        self.trace.add("runner", runner.index, "group-broke", *request_ids)
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                job.ended("died")

    # ---- the world tells it ----

    def runner_died(self, runner: int) -> list[RunnerJob]:
        """Every unfinished job of a dead runner is lost; returns them."""
        lost = [j for j in self.jobs.values() if j.runner == runner and j.end is None]
        for job in lost:
            job.ended("lost")
        return lost

    def unfinished(self) -> list[RunnerJob]:
        return [j for j in self.jobs.values() if j.end is None]


def _short(event: GenerationEvent) -> str:
    if isinstance(event, ChunkGenerated):
        return f"{event.request_id}#{event.seq}"
    return f"{event.request_id}!{type(event).__name__}"
