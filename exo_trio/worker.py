"""The worker: supervises one runner and relays commands and events.

It speaks the framed runner protocol over a `trio.abc.Stream` obtained from a
launcher: a real runner process in production (runner_launch.py), a fake runner
in the simulator. Everything the API calls (`submit`, `cancel`) is synchronous: it
puts a command in the outbox of the current runner, so a request can be registered
and dispatched with no scheduling point in between.

Every event the runner sends goes up to `events.deliver`: in a node that is the
Router (router.py), which relays it to the node that owns the request or hands
it to this node's streams registry; a unit test may give the registry itself.

When the runner dies (its pipe ends, it sends garbage, or it exits), every request
it held gets an explicit GenerationFailed at once, health turns bad, and the
runner is started again with backoff.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import msgspec
import trio

from exo_trio.observer import Observer
from exo_trio.runner.framing import FrameError, encode_frame, read_frames
from exo_trio.runner.protocol import (
    CancelAck,
    Loading,
    PromptCacheStats,
    Ready,
    RunnerError,
    RunnerToWorker,
    WorkerToRunner,
)
from exo_trio.types import (
    Cancel,
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    TextGeneration,
    is_terminal,
)

log = logging.getLogger(__name__)

RunnerState = Literal["starting", "loading", "ready", "restarting", "stopped", "failed"]


class RunnerConnection(Protocol):
    """One started runner: a byte stream to it, and a way to stop it."""

    stream: trio.abc.Stream
    pid: int | None

    async def aclose(self) -> None:
        """Stop the runner (politely, then by force) and wait for it to exit."""
        ...


Launcher = Callable[[], Awaitable[RunnerConnection]]


class EventSink(Protocol):
    """Where a runner's events go up: the node's Router (router.py), or in a unit
    test the streams registry itself. Synchronous: it never blocks."""

    def deliver(self, event: GenerationEvent) -> object: ...


# After the runner's input breaks, how long its output may still be read.
DRAIN_GRACE = 1.0


class RunnerUnavailable(Exception):
    """No ready runner can take a request right now."""


class RunnerDied(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# A runner that fails to load this many times in a row is not started again.
MAX_LOAD_FAILURES = 3


@dataclass
class Job:
    request_id: str
    cancelled: bool = False


@dataclass
class WorkerStats:
    restarts: int = 0
    submitted: int = 0
    cancels_sent: int = 0
    cancel_acks: int = 0
    max_steps_after_cancel: int = 0
    failed_by_death: int = 0
    # Generated tokens delivered, and the seconds spent generating them (gaps of
    # under a second between tokens): the shard's tokens/s while it works.
    tokens: int = 0
    generating_seconds: float = 0.0
    last_steps_after_cancel: dict[str, int] = field(default_factory=dict)
    jobs: tuple[str, ...] = ()  # in a snapshot: the requests the runner holds


class Worker:
    def __init__(
        self,
        launch: Launcher,
        events: EventSink,
        *,
        restart_backoff: float = 0.5,
        max_backoff: float = 10.0,
        restart: bool = True,
        max_load_failures: int = MAX_LOAD_FAILURES,
        name: str = "",
        observer: Observer | None = None,
    ) -> None:
        self._launch = launch
        self._events = events
        # Which runner this is (the instance id), for the observer.
        self.name = name
        self._observer = observer or Observer()
        self._restart_backoff = restart_backoff
        self._max_backoff = max_backoff
        # A single-rank runner is restarted in place; a rank of a sharded instance is
        # not (its peers died with it): the leader tears the instance down instead.
        self._restart = restart
        # The give-up rule: a runner that never became ready `max_load_failures`
        # times in a row, or that reported a permanent load error, is not restarted
        # (`gave_up` says why). One that crashes after a healthy run always is.
        self._max_load_failures = max_load_failures
        self._load_failures = 0
        self._permanent = False
        self.gave_up: str | None = None
        self._outbox: trio.MemorySendChannel[WorkerToRunner] | None = None
        self._state: RunnerState = "starting"
        self.load_fraction = 0.0
        self.load_phase = "starting"
        self.ready_info: Ready | None = None
        # The runner's latest prefix cache report (counts since it started).
        self.prompt_cache: PromptCacheStats | None = None
        self.last_error: str | None = None
        self.jobs: dict[str, Job] = {}
        self.stats = WorkerStats()
        self.pid: int | None = None
        self._ready_event = trio.Event()
        # When the runner last showed progress while holding work: any message from
        # it, or work arriving at an idle runner. A runner with work and no progress
        # for long is wedged (`stalled_for`, reported by /health).
        self._progress_at: float | None = None
        self._last_token_at: float | None = None

    @property
    def state(self) -> RunnerState:
        return self._state

    @state.setter
    def state(self, state: RunnerState) -> None:
        if state != self._state:
            self._state = state
            self._observer.runner_state(self.name, state)

    def statistics(self) -> WorkerStats:
        """A snapshot of the counters, with the requests the runner holds now."""
        stats = self.stats
        return replace(
            stats,
            last_steps_after_cancel=dict(stats.last_steps_after_cancel),
            jobs=tuple(self.jobs),
        )

    # ---- what the node calls (synchronous: no scheduling point) ----

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._outbox is not None

    def submit(self, command: TextGeneration) -> None:
        if not self.ready or self._outbox is None:
            raise RunnerUnavailable(self.unavailable_reason())
        if command.request_id in self.jobs:
            raise ValueError(f"request {command.request_id} is already running")
        if not self.jobs:
            # An idle runner owes no progress: its clock starts with this work.
            self._progress_at = trio.current_time()
        self.jobs[command.request_id] = Job(command.request_id)
        self._outbox.send_nowait(command)
        self.stats.submitted += 1

    def cancel(self, request_id: str) -> None:
        """Ask the runner to drop a request. A no-op if the request already ended."""
        job = self.jobs.get(request_id)
        if job is None or job.cancelled or self._outbox is None:
            return
        job.cancelled = True
        self._outbox.send_nowait(Cancel(request_id=request_id))
        self.stats.cancels_sent += 1

    def stalled_for(self) -> float:
        """Seconds the runner has held work without sending anything (0 when it
        holds none). Long stalls mean a wedged runner, even though its process is
        alive and its pipe open."""
        if not self.jobs or self._progress_at is None:
            return 0.0
        return max(0.0, trio.current_time() - self._progress_at)

    def unavailable_reason(self) -> str:
        if self.state == "loading":
            return f"model is loading ({self.load_phase}, {self.load_fraction:.0%})"
        if self.last_error:
            return f"runner is {self.state}: {self.last_error}"
        return f"runner is {self.state}"

    async def wait_ready(self) -> None:
        await self._ready_event.wait()

    # ---- supervision ----

    async def run(self) -> None:
        """Start the runner, keep it running, restart it when it dies. Runs until
        cancelled; on the way out the runner is stopped and its jobs failed."""
        backoff = self._restart_backoff
        try:
            while True:
                self.state = "starting" if self.stats.restarts == 0 else "restarting"
                ran_ready = False
                try:
                    conn = await self._launch()
                except OSError as exc:
                    self.last_error = f"could not start runner: {exc}"
                    log.error("%s", self.last_error)
                else:
                    self.pid = conn.pid
                    ran_ready = await self._serve(conn)
                if ran_ready:
                    backoff = self._restart_backoff
                    self._load_failures = 0
                else:
                    self._load_failures += 1
                if self._permanent or self._load_failures >= self._max_load_failures:
                    self._give_up()
                    return
                if not self._restart:
                    self.state = "failed"
                    return
                self.stats.restarts += 1
                log.warning("runner down (%s); restarting in %.1fs", self.last_error, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
        finally:
            if self.state != "failed":
                self.state = "stopped"

    def _give_up(self) -> None:
        tries = "once" if self._load_failures == 1 else f"{self._load_failures} times in a row"
        kind = "a permanent error" if self._permanent else "no success"
        self.gave_up = (
            f"the model cannot be loaded ({kind}, tried {tries}): {self.last_error}; "
            "not restarting it"
        )
        self.last_error = self.gave_up
        self.state = "failed"
        log.error("%s", self.gave_up)

    async def _serve(self, conn: RunnerConnection) -> bool:
        """Run one runner until it dies. Returns whether it ever became ready."""
        send, receive = trio.open_memory_channel[WorkerToRunner](math.inf)
        self._outbox = send
        self.state = "loading"
        became_ready = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_commands, conn.stream, receive, nursery.cancel_scope)
                try:
                    async for message in read_frames(conn.stream, RunnerToWorker):  # type: ignore[arg-type]
                        if self._handle(message):
                            became_ready = True
                    self.last_error = "runner closed its output"
                except (RunnerDied, FrameError, trio.BrokenResourceError) as exc:
                    self.last_error = str(exc) or type(exc).__name__
                    self._permanent = not became_ready and getattr(exc, "permanent", False)
                nursery.cancel_scope.cancel()
        finally:
            self._outbox = None
            send.close()
            self.state = "restarting"
            self.ready_info = None
            self._fail_all(self.last_error or "runner stopped")
            with trio.CancelScope(shield=True):
                await conn.aclose()
        return became_ready

    async def _write_commands(
        self,
        stream: trio.abc.SendStream,
        commands: trio.MemoryReceiveChannel[WorkerToRunner],
        scope: trio.CancelScope,
    ) -> None:
        async for command in commands:
            try:
                frame = encode_frame(command)
            except (TypeError, ValueError, OverflowError) as exc:
                # A command the protocol cannot carry is that request's problem, not
                # the node's: fail it alone (the API validates first; this is the
                # backstop, since an escaping error here once killed the node).
                self._refuse(command, f"cannot send the request to the runner: {exc}")
                continue
            try:
                await stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # The runner is dying, but what it wrote before it died may still be
                # in the pipe: let the reader drain it (up to EOF, or a grace period
                # if the output end stays open) instead of cancelling it at once,
                # which would drop other requests' last chunks. (Found by the
                # simulator: sim/corpus/bug-worker-drops-output-202.json.)
                self.last_error = f"runner input closed: {exc}"
                scope.deadline = min(scope.deadline, trio.current_time() + DRAIN_GRACE)
                return

    def _refuse(self, command: WorkerToRunner, reason: str) -> None:
        log.error("%s", reason)
        request_id = getattr(command, "request_id", None)
        if isinstance(command, TextGeneration) and self.jobs.pop(request_id, None) is not None:
            self._events.deliver(
                GenerationFailed(request_id=command.request_id, kind="invalid", message=reason)
            )

    def _handle(self, message: RunnerToWorker) -> bool:
        """Apply one runner message. Returns True when the runner became ready."""
        self._progress_at = trio.current_time()
        if isinstance(message, Loading):
            self.load_fraction, self.load_phase = message.fraction, message.phase
            log.debug("loading model: %3.0f%% %s", message.fraction * 100, message.phase)
            return False
        if isinstance(message, Ready):
            self.ready_info = message
            self.state = "ready"
            self.last_error = None
            self.load_fraction, self.load_phase = 1.0, "ready"
            self._ready_event.set()
            log.info("runner ready (pid %s): %s", message.pid, message.model)
            return True
        if isinstance(message, CancelAck):
            self.jobs.pop(message.request_id, None)
            self.stats.cancel_acks += 1
            self.stats.max_steps_after_cancel = max(
                self.stats.max_steps_after_cancel, message.steps_after_cancel
            )
            self.stats.last_steps_after_cancel[message.request_id] = message.steps_after_cancel
            if len(self.stats.last_steps_after_cancel) > 256:
                self.stats.last_steps_after_cancel.pop(
                    next(iter(self.stats.last_steps_after_cancel))
                )
            return False
        if isinstance(message, PromptCacheStats):
            self.prompt_cache = message
            return False
        if isinstance(message, RunnerError):
            raise RunnerDied(f"runner error: {message.message}", permanent=message.permanent)
        # A generation event. Terminal events end the job; events of a cancelled job
        # still go to the registry, which counts them as late rather than dropping
        # them unseen.
        if is_terminal(message):
            self.jobs.pop(message.request_id, None)
        elif isinstance(message, ChunkGenerated):
            self._count_token()
        self._events.deliver(message)
        return False

    def _count_token(self) -> None:
        now = trio.current_time()
        if self._last_token_at is not None and now - self._last_token_at < 1.0:
            self.stats.generating_seconds += now - self._last_token_at
        self._last_token_at = now
        self.stats.tokens += 1

    def _fail_all(self, reason: str) -> None:
        jobs, self.jobs = self.jobs, {}
        for job in jobs.values():
            self.stats.failed_by_death += 1
            self._events.deliver(
                GenerationFailed(
                    request_id=job.request_id,
                    kind="runner_died",
                    message=f"the runner stopped while generating: {reason}",
                )
            )

    def health(self) -> dict[str, object]:
        return {
            "state": self.state,
            "pid": self.pid,
            "load_fraction": round(self.load_fraction, 3),
            "load_phase": self.load_phase,
            "active_requests": len(self.jobs),
            "stalled_for": round(self.stalled_for(), 3),
            "restarts": self.stats.restarts,
            "last_error": self.last_error,
            "gave_up": self.gave_up is not None,
            "max_steps_after_cancel": self.stats.max_steps_after_cancel,
            **self.runner_report(),
        }

    def runner_report(self) -> dict[str, object]:
        """What the runner computes with and what its prefix cache holds."""
        return {
            "blas": self.ready_info.blas if self.ready_info is not None else None,
            "prompt_cache": msgspec.to_builtins(self.prompt_cache),
        }
