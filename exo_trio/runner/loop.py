"""A runner process's protocol I/O, and the main loop of a runner that holds a whole
model: one Engine, the framed protocol on stdin/stdout.

Started as ``python -m exo_trio.runner`` (``__main__.py``); with ``--world-size N``
(N > 1) the process is one rank of a model split across an `mx.distributed` group
instead (rank.py), which reuses the I/O pieces here.

The worker writes commands (`WorkerToRunner`: TextGeneration, Cancel, Shutdown)
to our stdin and reads `RunnerToWorker` messages from our stdout, both as
length-prefixed msgpack frames (framing.py). The sequence on stdout is:
`Loading`... then `Ready` (or `RunnerError` and exit status 1 if the model does
not load), then generation events and `CancelAck`s.

Structure:

* A reader thread decodes frames from stdin into a `queue.Queue`, stamping each
  command with its arrival time. Threads are fine here: this process never runs
  inside the simulator (the simulator uses a fake runner speaking the same
  protocol), and a thread is the simplest way to keep reading commands while the
  main thread is busy inside an MLX step.
* The main loop drains every queued command without blocking, applies them
  (submit / cancel / shutdown), runs one `Engine.step()` if there is work, and
  writes everything that produced in one write. With no work it blocks on the
  queue; when a request comes, it may wait a few milliseconds more for others
  that come with it, so that a burst starts together (start_policy.py). So a
  Cancel that arrives during a step is applied right after that step: the
  request runs at most one more step (`CancelAck.steps_after_cancel` <= 1).
* After a step that changed the prefix cache, a `PromptCacheStats` goes out with
  the step's events.
* EOF on stdin means the worker is gone or wants us gone: like Shutdown, every
  in-flight request gets GenerationFailed(kind="cancelled") and we exit 0.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from exo_trio.blas import loaded_blas
from exo_trio.runner.framing import FrameDecoder, FrameError, encode_frame
from exo_trio.runner.protocol import (
    CancelAck,
    Loading,
    PromptCacheStats,
    Ready,
    RunnerError,
    RunnerToWorker,
    Shutdown,
    WorkerToRunner,
)
from exo_trio.runner.start_policy import hold_seconds
from exo_trio.types import Cancel, TextGeneration

if TYPE_CHECKING:  # the engine pulls in MLX; import it only after stdout is claimed
    from exo_trio.runner.engine import Engine

log = logging.getLogger("exo_trio.runner")

READ_SIZE = 65536


def claim_stdout() -> int:
    """Keep the real stdout for the protocol and point fd 1 at stderr.

    Returns a private duplicate of the original stdout. Anything else that writes
    to fd 1 afterwards (a library's print, a C extension's printf, a warning) lands
    on stderr instead of corrupting the frame stream. Must run before MLX,
    transformers or anything else chatty is imported.
    """
    sys.stdout.flush()
    protocol_fd = os.dup(1)  # not inheritable: child processes cannot write frames
    os.dup2(2, 1)
    return protocol_fd


class ProtocolWriter:
    """Writes messages to the protocol fd, one os.write loop per batch.

    Unbuffered on purpose: a batch is encoded into one bytes object and written
    completely before returning, so there is nothing to flush and nothing left in
    a buffer if the process dies right after. A lock keeps batches whole when a
    second thread (a sharded runner's watchdog or stdin thread) also writes.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        return self._fd

    def send(self, messages: Sequence[RunnerToWorker]) -> None:
        if not messages:
            return
        data = b"".join(encode_frame(m) for m in messages)
        with self._lock:
            self._write(data)

    def send_final(self, messages: Sequence[RunnerToWorker], status: int) -> NoReturn:
        """Write the last messages and end the process at once, from any thread.

        os._exit, not sys.exit: the main thread may be blocked inside MLX (a
        collective waiting for a peer) and must not be waited for. The lock wait is
        bounded in case the main thread holds it, stuck on a full pipe.
        """
        data = b"".join(encode_frame(m) for m in messages)
        locked = self._lock.acquire(timeout=2.0)
        try:
            if locked and data:
                self._write(data)
        except OSError:
            pass
        finally:
            sys.stderr.flush()
            os._exit(status)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


def progress_to(writer: ProtocolWriter) -> Callable[[float, str], None]:
    """An Engine.load progress callback that reports `Loading` to the worker."""
    return lambda fraction, phase: writer.send([Loading(fraction=fraction, phase=phase)])


# Load failures that a restart would only repeat: what mlx-lm raises for an
# unsupported architecture or a malformed config (ValueError, KeyError), missing
# files, and code the model needs that is not installed.
PERMANENT_LOAD_ERRORS = (ValueError, KeyError, FileNotFoundError, ImportError, NotImplementedError)


def report_load_failure(writer: ProtocolWriter, model: Path, exc: Exception) -> int:
    """Log and report a model that did not load; returns the exit status."""
    permanent = isinstance(exc, PERMANENT_LOAD_ERRORS)
    if permanent:
        log.error("loading %s failed: %s: %s", model, type(exc).__name__, exc)
    else:
        log.error("loading %s failed", model, exc_info=exc)
    message = f"loading {model} failed: {type(exc).__name__}: {exc}"
    writer.send([RunnerError(message=message, permanent=permanent)])
    return 1


def report_ready(writer: ProtocolWriter, engine: Engine, model_id: str) -> None:
    blas = loaded_blas()
    log.info("computing with BLAS: %s", blas)
    cache = engine.prompt_cache
    if engine.prompt_cache_off_reason is not None:
        log.info("prefix cache off: %s", engine.prompt_cache_off_reason)
    else:
        log.info(
            "prefix cache: %d bytes (%d tokens of %d bytes)",
            cache.capacity_bytes,
            cache.capacity_tokens,
            cache.bytes_per_token,
        )
    writer.send(
        [
            Ready(
                model=model_id,
                context_length=engine.context_length,
                max_batch=engine.max_batch,
                pid=os.getpid(),
                blas=blas,
            ),
            engine.prompt_cache_stats(),
        ]
    )


class CacheReports:
    """Sends the prefix cache's stats when they changed since the last report."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._last: PromptCacheStats | None = engine.prompt_cache_stats()

    def changed(self) -> list[PromptCacheStats]:
        stats = self.engine.prompt_cache_stats()
        if stats == self._last:
            return []
        self._last = stats
        return [stats]


@dataclass(frozen=True)
class Arrival:
    """A command and when it arrived (time.monotonic())."""

    command: WorkerToRunner
    at: float


@dataclass(frozen=True)
class EndOfInput:
    """stdin ended (error is None) or became unreadable/undecodable."""

    error: str | None = None


QueueItem = Arrival | EndOfInput


def read_commands(fd: int, out: queue.Queue[QueueItem]) -> None:
    """Reader thread: decode frames from fd into the queue until EOF or error."""
    decoder = FrameDecoder(WorkerToRunner)  # type: ignore[arg-type]
    try:
        while True:
            data = os.read(fd, READ_SIZE)
            if not data:
                if decoder.pending_bytes:
                    out.put(EndOfInput("stdin ended inside a frame"))
                else:
                    out.put(EndOfInput())
                return
            now = time.monotonic()
            for command in decoder.feed(data):
                out.put(Arrival(command, now))
    except (FrameError, OSError) as exc:
        out.put(EndOfInput(f"bad command stream: {exc}"))


class Runner:
    """The main loop around an Engine. Single-threaded apart from the reader."""

    def __init__(self, engine: Engine, writer: ProtocolWriter, commands: queue.Queue[QueueItem]):
        self.engine = engine
        self.writer = writer
        self.commands = commands
        # monotonic() at the end of the last step; a Cancel that arrived before
        # this was already waiting while that step ran.
        self._last_step_end = float("-inf")
        # Requests submitted since the last step: they have not run a step yet.
        self._fresh: set[str] = set()
        self._cache_reports = CacheReports(engine)

    def run(self) -> int:
        """Serve until Shutdown or EOF; returns the exit status."""
        while True:
            outgoing: list[RunnerToWorker] = []
            for item in self._take(block=not self.engine.has_work):
                if isinstance(item, EndOfInput) or isinstance(item.command, Shutdown):
                    return self._stop(item, outgoing)
                outgoing.extend(self._apply(item))
            if self.engine.has_work:
                self._fresh.clear()
                outgoing.extend(self.engine.step())
                self._last_step_end = time.monotonic()
                outgoing.extend(self._cache_reports.changed())
            self.writer.send(outgoing)

    def _take(self, *, block: bool) -> list[QueueItem]:
        """Everything queued now; with block=True (an idle engine) wait for at least
        one item, then for the others of a burst (`_hold`)."""
        items: list[QueueItem] = []
        if block:
            items.append(self.commands.get())
        self._drain(items)
        if block:
            self._hold(items)
        return items

    def _drain(self, items: list[QueueItem]) -> None:
        while True:
            try:
                items.append(self.commands.get_nowait())
            except queue.Empty:
                return

    def _hold(self, items: list[QueueItem]) -> None:
        """An idle runner given requests waits a little for more (start_policy.py):
        a burst of requests reaches it spread over milliseconds."""
        while True:
            arrivals = []
            for item in items:
                if isinstance(item, EndOfInput) or isinstance(item.command, Shutdown):
                    return
                if isinstance(item.command, TextGeneration):
                    arrivals.append(item.at)
            now = time.monotonic()
            wait = hold_seconds(arrivals, now, self.engine.step_seconds, busy=False)
            if wait > 0:
                try:
                    items.append(self.commands.get(timeout=wait))
                    self._drain(items)
                    continue
                except queue.Empty:
                    now = time.monotonic()
            if arrivals and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "starting %d request(s) that arrived over %.1f ms, %.1f ms after the first",
                    len(arrivals),
                    1e3 * (arrivals[-1] - arrivals[0]),
                    1e3 * (now - arrivals[0]),
                )
            return

    def _apply(self, item: Arrival) -> list[RunnerToWorker]:
        command = item.command
        if isinstance(command, TextGeneration):
            self._fresh.add(command.request_id)
            return list(self.engine.submit(command))
        if isinstance(command, Cancel):
            rid = command.request_id
            known = self.engine.cancel(rid)
            # The request ran a step after the Cancel arrived iff a step finished
            # after the arrival and the request was already in that step.
            ran = known and rid not in self._fresh and item.at < self._last_step_end
            self._fresh.discard(rid)
            return [CancelAck(request_id=rid, steps_after_cancel=int(ran), known=known)]
        raise TypeError(f"unexpected command {command!r}")  # Shutdown is handled by run()

    def _stop(self, item: QueueItem, outgoing: list[RunnerToWorker]) -> int:
        if isinstance(item, EndOfInput) and item.error is not None:
            # The command stream is corrupt: nothing after this point can be trusted.
            log.error("%s", item.error)
            outgoing.extend(self.engine.fail_all("internal", item.error))
            outgoing.append(RunnerError(message=item.error))
            self.writer.send(outgoing)
            return 1
        reason = "shutdown" if isinstance(item, Arrival) else "stdin closed"
        log.info("%s: stopping with %d request(s) in flight", reason, len(self.engine.active))
        outgoing.extend(self.engine.fail_all("cancelled", f"runner stopped ({reason})"))
        self.writer.send(outgoing)
        return 0
