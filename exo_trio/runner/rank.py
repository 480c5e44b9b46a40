"""One rank of a runner whose model is split across an `mx.distributed` group.

Started as ``python -m exo_trio.runner --model PATH --model-id ID [--max-batch N]
--rank R --world-size N --hostfile FILE [--backend ring|jaccl]
[--sharding pipeline|tensor] [--layers START:END]``, one process per node. The
node writes the hostfile (ring: JSON ``[["host:port"], ...]``, one list per rank
in rank order; rank r listens on its own entries) and picks each rank's layer
range (pipeline: contiguous, in rank order, together tiling all layers; tensor:
``0:n_layers`` or omitted).

Roles:

* **Rank 0 is the coordinator.** Only it takes TextGeneration / Cancel commands
  and only it emits generation events and CancelAcks, exactly as a
  single-process runner does. Before every step it sends every rank the commands
  applied at that step over a TCP side channel (step_sync.py), and it emits a
  step's events only once every rank has reported the same events for that
  step. Requests without a seed get a random one first, so that every rank
  samples the same tokens.
* **Other ranks follow.** They apply rank 0's orders and step in lockstep,
  emitting only Loading / Ready and RunnerError on their pipe. Between steps they
  sleep in a socket read (MLX's ring busy-waits inside a collective, so nothing
  waits in one between steps: an idle instance uses no CPU). A TextGeneration
  sent to them is refused (GenerationFailed "invalid"), a Cancel acknowledged as
  unknown.

Every rank emits Loading... then Ready once the whole group has loaded (the
warmup forward pass is a collective, so it waits for the slowest rank).

Endings:

* Shutdown or EOF on rank 0: every rank is told to stop; rank 0 fails its
  in-flight requests with kind "cancelled" (as an unsharded runner does); all
  ranks exit 0.
* Shutdown or EOF on another rank: it exits 0 at once. Its side channel closes,
  which is the teardown signal for the other ranks (next point).
* A peer is lost (its side channel or a collective fails: the process died or
  the link broke) or the ranks diverged (different tokens): rank 0 fails every
  in-flight request with kind "runner_died" (none of the step's tokens is
  emitted), every rank sends RunnerError and exits 1 within moments.
* No progress for --stall-timeout seconds (a peer frozen, or a link cut without
  a reset): a socket timeout, or for a forward pass a watchdog thread, does the
  same as above. Rank 0 runs an empty exchange every second while idle (a
  heartbeat), so every rank notices a lost peer without waiting for a request.
* The group cannot be formed within --connect-timeout seconds, or the layout is
  inconsistent (ranges that do not tile the layers, tensor sharding that the
  model does not support): RunnerError, exit 1.

The command line and the hostfile are the same as before the side channel: rank
0 listens on an ephemeral port on its own hostfile address and tells the other
ranks the port through the group itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from exo_trio.runner.framing import FrameDecoder, FrameError, encode_frame
from exo_trio.runner.loop import (
    READ_SIZE,
    Arrival,
    CacheReports,
    EndOfInput,
    ProtocolWriter,
    QueueItem,
    Runner,
    progress_to,
    read_commands,
    report_load_failure,
    report_ready,
)
from exo_trio.runner.protocol import (
    CancelAck,
    Loading,
    RunnerError,
    RunnerToWorker,
    Shutdown,
    WorkerToRunner,
)

# No MLX in step_sync at module level: safe to import before stdout is claimed.
from exo_trio.runner.step_sync import FollowerChannel, GroupStalled, LeaderChannel, events_digest
from exo_trio.types import (
    Cancel,
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    TextGeneration,
)

if TYPE_CHECKING:  # these pull in MLX, imported only once stdout is claimed
    import mlx.core as mx

    from exo_trio.runner.engine import Engine
    from exo_trio.runner.layer_split import ShardSpec

__all__ = ["add_shard_arguments", "check_shard_arguments", "serve_sharded"]

log = logging.getLogger("exo_trio.runner")

# Rank 0 runs an empty exchange this often while idle, so that a lost peer is
# noticed without waiting for the next request and the other ranks' waits stay short.
HEARTBEAT_SECONDS = 1.0
# After a stop, rank 0 waits this long at most for the other ranks to leave first.
STOP_LINGER_SECONDS = 1.0
_GENERATION_EVENTS = (ChunkGenerated, GenerationFinished, GenerationFailed)


# -- command line -----------------------------------------------------------------------


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sharding (world size > 1)")
    group.add_argument("--rank", type=int, default=0, help="this runner's rank")
    group.add_argument("--world-size", type=int, default=1, help="ranks in the instance")
    group.add_argument("--hostfile", type=Path, help='ring: JSON [["host:port"], ...] by rank')
    group.add_argument("--backend", choices=("ring", "jaccl"), default="ring")
    group.add_argument("--sharding", choices=("pipeline", "tensor"), default="pipeline")
    group.add_argument(
        "--layers", help="pipeline: this rank's layers START:END (default: even split)"
    )
    group.add_argument("--ibv-devices", type=Path, help="jaccl: the RDMA device matrix file")
    group.add_argument("--jaccl-coordinator", help="jaccl: rank 0's host:port")
    group.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to form the group"
    )
    group.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="seconds a step or exchange may wait on the group before it is declared dead",
    )


def check_shard_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from exo_trio.runner.layer_split import parse_layers  # no MLX import at module level there

    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size})")
    if args.layers is not None:
        try:
            args.layers = parse_layers(args.layers)
        except ValueError as exc:
            parser.error(str(exc))
    if args.world_size > 1 and args.backend == "ring" and args.hostfile is None:
        parser.error("--hostfile is required with --world-size > 1 and the ring backend")


def _spec(args: argparse.Namespace) -> ShardSpec:
    from exo_trio.runner.layer_split import ShardSpec

    return ShardSpec(
        rank=args.rank,
        world_size=args.world_size,
        backend=args.backend,
        sharding=args.sharding,
        layers=args.layers,
        hostfile=args.hostfile,
        ibv_devices=args.ibv_devices,
        jaccl_coordinator=args.jaccl_coordinator,
    )


# -- watchdog ---------------------------------------------------------------------------


class Watchdog:
    """Calls `on_expire(what)` from its own thread if an armed deadline passes.

    A collective blocked on a silent peer cannot be interrupted from Python, so
    the watchdog is the only way out: its handler writes the last messages and
    ends the process. Arming is two attribute writes, cheap enough for every step.
    """

    def __init__(self, on_expire: Callable[[str, float], None], poll: float = 0.2) -> None:
        self._on_expire = on_expire
        self._poll = poll
        self._deadline: float | None = None
        self._seconds = 0.0
        self._what = ""
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str) -> None:
        self._what = what
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds

    def disarm(self) -> None:
        self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._on_expire(self._what, self._seconds)
                return


# The guard process of `join_group`. MLX holds the GIL while it forms the group
# (the ring's accepting side waits forever for a peer that never comes), so no
# thread of ours can act on a timeout; a separate process can. It waits for the
# runner to close `ready_fd` (joined, or dead); on timeout it writes the prepared
# RunnerError frame to the protocol pipe and kills the runner.
_GUARD_CODE = """
import os, select, signal, sys
protocol_fd, ready_fd, pid = (int(a) for a in sys.argv[1:4])
if not select.select([ready_fd], [], [], float(sys.argv[4]))[0]:
    os.write(protocol_fd, bytes.fromhex(sys.argv[5]))
    os.kill(pid, signal.SIGKILL)
"""


class JoinGuard:
    """Ends this process (RunnerError, then SIGKILL) if the group is not formed in time."""

    def __init__(self, protocol_fd: int, seconds: float) -> None:
        self._protocol_fd = protocol_fd
        self._seconds = seconds
        self._ready_write: int | None = None

    def __enter__(self) -> JoinGuard:
        message = f"the distributed group was not formed within {self._seconds:.0f}s"
        frame = encode_frame(RunnerError(message=message)).hex()
        ready_read, self._ready_write = os.pipe()
        try:
            subprocess.Popen(
                [
                    *(sys.executable, "-c", _GUARD_CODE),
                    *(str(self._protocol_fd), str(ready_read), str(os.getpid())),
                    *(str(self._seconds), frame),
                ],
                pass_fds=(self._protocol_fd, ready_read),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        finally:
            os.close(ready_read)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._ready_write is not None
        os.close(self._ready_write)  # the guard sees EOF and exits


# -- rank 0 -----------------------------------------------------------------------------


class Coordinator(Runner):
    """Rank 0: the single-process Runner's loop with an exchange around every step."""

    def __init__(
        self,
        engine: Engine,
        writer: ProtocolWriter,
        commands: queue.Queue[QueueItem],
        channel: LeaderChannel,
        watchdog: Watchdog,
        stall_timeout: float,
        sync_steps: bool = False,
    ) -> None:
        super().__init__(engine, writer, commands)
        self.channel = channel
        self.watchdog = watchdog
        self.stall_timeout = stall_timeout
        self.sync_steps = sync_steps
        # Requests taken from the queue but not yet in the engine: if the group
        # fails now they still need their failure event.
        self._unapplied: list[str] = []
        # What this exchange produced so far and has not emitted (it waits for the
        # other ranks' reports): if the group fails now, none of it is sent.
        self._pending: list[RunnerToWorker] = []

    def in_flight(self) -> list[str]:
        """Requests that need a failure event if the group fails now."""
        pending = [e.request_id for e in self._pending if isinstance(e, _GENERATION_EVENTS)]
        return list(dict.fromkeys([*pending, *self._unapplied, *sorted(self.engine.active)]))

    def run(self) -> int:
        while True:
            stop_item: QueueItem | None = None
            arrivals: list[Arrival] = []
            for item in self._take_or_heartbeat():
                if isinstance(item, EndOfInput) or isinstance(item.command, Shutdown):
                    stop_item = item  # anything after a stop is never answered
                    break
                arrivals.append(_with_seed(item))
            self._unapplied = [
                a.command.request_id for a in arrivals if isinstance(a.command, TextGeneration)
            ]
            outgoing: list[RunnerToWorker] = []
            self._pending = outgoing
            try:
                # Orders first: the other ranks apply them while this one does.
                seq = self.channel.send_orders(
                    stop=stop_item is not None, commands=[a.command for a in arrivals]
                )
                for arrival in arrivals:
                    outgoing.extend(self._apply(arrival))
                self._unapplied = []
                if stop_item is not None:
                    status = self._stop(stop_item, outgoing)
                    self.channel.close(linger=STOP_LINGER_SECONDS)
                    return status
                if self.engine.has_work:
                    # A collective blocked on a silent peer cannot be interrupted:
                    # only the watchdog gets this process out of a stalled step.
                    self.watchdog.arm(self.stall_timeout, "running a step")
                    self._fresh.clear()
                    outgoing.extend(self.engine.step())
                    if self.sync_steps:
                        self.engine.wait_queued()  # see _sync_steps
                    self._last_step_end = time.monotonic()
                    self.watchdog.disarm()
                    outgoing.extend(self._cache_reports.changed())
                # Nothing is emitted before every rank reports the same events. The
                # other ranks' steps end with the same collectives as this one, so the
                # reports are due (unless sync_steps, the next forward pass already
                # runs meanwhile).
                self.channel.confirm(seq, _digest(outgoing))
            except BrokenPipeError:
                raise  # the worker is gone: nobody to tell
            except Exception as exc:  # a peer is gone or stalled, or the ranks diverged
                return self._group_failed(exc)
            self._pending = []
            self.writer.send(outgoing)

    def _take_or_heartbeat(self) -> list[QueueItem]:
        if self.engine.has_work:
            return self._take(block=False)
        try:
            first = self.commands.get(timeout=HEARTBEAT_SECONDS)
        except queue.Empty:
            return []  # nothing to do: the exchange is a heartbeat
        items = [first]
        self._drain(items)
        # The wait for a burst's other requests happens here, before the orders go
        # out: every rank then starts the same requests in the same step.
        self._hold(items)
        return items

    def _group_failed(self, exc: Exception) -> int:
        self.watchdog.disarm()
        message = _failure_message(exc)
        log.error("%s", message)
        # Unconfirmed events are not sent: a lost or diverged rank means they may
        # have been computed from garbage. CancelAcks stand (the cancel was
        # applied); every request still in flight, or with unsent events, fails.
        in_flight = self.in_flight()
        outgoing: list[RunnerToWorker] = [
            m for m in self._pending if not isinstance(m, _GENERATION_EVENTS)
        ]
        outgoing.extend(
            GenerationFailed(request_id=rid, kind="runner_died", message=message)
            for rid in in_flight
        )
        self.engine.fail_all("runner_died", message)  # forget them; events sent above
        outgoing.append(RunnerError(message=message))
        self.writer.send(outgoing)
        return 1


def _with_seed(item: Arrival) -> Arrival:
    """Give a sampled request without a seed a random one, so all ranks draw alike."""
    command = item.command
    if (
        isinstance(command, TextGeneration)
        and command.params.temperature > 0
        and command.params.seed is None
    ):
        params = msgspec.structs.replace(command.params, seed=secrets.randbits(63))
        return Arrival(msgspec.structs.replace(command, params=params), item.at)
    return item


def _digest(events: Sequence[object]) -> int:
    return events_digest([e for e in events if isinstance(e, _GENERATION_EVENTS)])


def _failure_message(exc: Exception) -> str:
    if isinstance(exc, GroupStalled):
        return str(exc)  # already says "distributed group stalled: ..."
    return f"distributed group failed: {exc}"


# -- other ranks ------------------------------------------------------------------------


class Follower:
    """A rank > 0: applies rank 0's orders and steps in lockstep, emits no events."""

    def __init__(
        self,
        engine: Engine,
        writer: ProtocolWriter,
        channel: FollowerChannel,
        watchdog: Watchdog,
        stall_timeout: float,
        sync_steps: bool = False,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.channel = channel
        self.watchdog = watchdog
        self.stall_timeout = stall_timeout
        self.sync_steps = sync_steps
        self._cache_reports = CacheReports(engine)

    def run(self) -> int:
        while True:
            events: list[GenerationEvent] = []
            try:
                # Rank 0 sends orders at least every heartbeat, or right after its
                # step; in between this thread sleeps in the kernel.
                orders = self.channel.receive(self.stall_timeout + HEARTBEAT_SECONDS)
                for command in orders.commands:
                    if isinstance(command, TextGeneration):
                        events.extend(self.engine.submit(command))
                    else:
                        self.engine.cancel(command.request_id)
                if orders.stop:
                    self.engine.fail_all("cancelled", "runner stopped")
                    return 0
                if self.engine.has_work:
                    self.watchdog.arm(self.stall_timeout, "running a step")
                    events.extend(self.engine.step())
                    if self.sync_steps:
                        self.engine.wait_queued()
                    self.watchdog.disarm()
                self.channel.report(orders.seq, _digest(events), self.stall_timeout)
                # This rank's part of the prefix cache, for its node's metrics.
                self.writer.send(self._cache_reports.changed())
            except Exception as exc:
                self.watchdog.disarm()
                message = _failure_message(exc)
                log.error("%s", message)
                self.writer.send([RunnerError(message=message)])
                return 1


def follower_stdin(fd: int, writer: ProtocolWriter, rank: int) -> None:
    """Thread of a rank > 0: it takes no requests; Shutdown or EOF ends the process."""
    decoder = FrameDecoder(WorkerToRunner)  # type: ignore[arg-type]
    refusal = f"rank {rank} of a sharded runner takes no requests; send them to rank 0"
    try:
        while True:
            data = os.read(fd, READ_SIZE)
            if not data:
                log.info("stdin closed: leaving the group")
                writer.send_final([], 0)
            for command in decoder.feed(data):
                if isinstance(command, Shutdown):
                    log.info("shutdown: leaving the group")
                    writer.send_final([], 0)
                if isinstance(command, TextGeneration):
                    writer.send(
                        [
                            GenerationFailed(
                                request_id=command.request_id, kind="invalid", message=refusal
                            )
                        ]
                    )
                elif isinstance(command, Cancel):
                    writer.send(
                        [
                            CancelAck(
                                request_id=command.request_id, steps_after_cancel=0, known=False
                            )
                        ]
                    )
    except (FrameError, OSError) as exc:
        writer.send_final([RunnerError(message=f"bad command stream: {exc}")], 1)


# -- the process ------------------------------------------------------------------------


def serve_sharded(args: argparse.Namespace, writer: ProtocolWriter) -> int:
    """Join the group, load this rank's shard, serve; returns the exit status."""
    rank = args.rank
    commands: queue.Queue[QueueItem] = queue.Queue()
    if rank == 0:
        reader: Callable[[], None] = lambda: read_commands(0, commands)  # noqa: E731
    else:
        reader = lambda: follower_stdin(0, writer, rank)  # noqa: E731
    threading.Thread(target=reader, name="stdin", daemon=True).start()

    serving: list[Coordinator] = []  # set once rank 0 serves, for the watchdog

    def on_stall(what: str, seconds: float) -> None:
        message = (
            f"distributed group stalled: no progress for {seconds:.0f}s while {what} "
            "(a peer is stuck or unreachable)"
        )
        log.error("%s", message)
        failed: list[RunnerToWorker] = []
        if serving:
            try:
                in_flight = serving[0].in_flight()
            except RuntimeError:  # the main thread changed the request table meanwhile
                in_flight = []
            failed = [
                GenerationFailed(request_id=rid, kind="runner_died", message=message)
                for rid in in_flight
            ]
        writer.send_final([*failed, RunnerError(message=message)], 1)

    watchdog = Watchdog(on_stall)
    try:
        writer.send([Loading(fraction=0.0, phase="joining group")])
        from exo_trio.runner.engine import Engine
        from exo_trio.runner.layer_split import ShardingError, apply_sharding, join_group
        from exo_trio.runner.model_files import missing_files
        from exo_trio.runner.step_sync import StepSyncError, open_channel

        spec = _spec(args)
        # A node fetches only the weight files its layers need: make sure they are
        # all here before the group waits on this rank.
        layers = args.layers if args.sharding == "pipeline" else None
        missing = missing_files(Path(args.model), layers)
        if missing:
            raise ShardingError(f"{args.model} lacks the weight files {missing} for this rank")
        started = time.monotonic()
        with JoinGuard(writer.fd, args.connect_timeout):
            group = join_group(spec)
            channel = open_channel(
                group,
                spec,
                timeout=max(1.0, args.connect_timeout - (time.monotonic() - started)),
                stall_timeout=args.stall_timeout,
            )
        log.info("rank %d of %d joined the %s group", rank, args.world_size, args.backend)
        engine = Engine.load(
            args.model,
            args.model_id,
            max_batch=args.max_batch,
            on_progress=progress_to(writer),
            prepare=lambda model, config: apply_sharding(model, config, group, spec),
            recover_step_errors=False,
            adaptive_pipelining=False,
            prompt_cache_bytes=args.prompt_cache_bytes,
        )
        _agree_on_prompt_cache(engine, group)
    except BrokenPipeError:
        return 1
    except ShardingError as exc:
        log.error("%s", exc)
        writer.send([RunnerError(message=str(exc))])
        return 1
    except StepSyncError as exc:
        message = f"the distributed group's step channel was not formed: {exc}"
        log.error("%s", message)
        writer.send([RunnerError(message=message)])
        return 1
    except Exception as exc:
        return report_load_failure(writer, args.model, exc)
    try:
        report_ready(writer, engine, args.model_id)
        sync_steps = _sync_steps(spec)
        if isinstance(channel, LeaderChannel):
            coordinator = Coordinator(
                engine, writer, commands, channel, watchdog, args.stall_timeout, sync_steps
            )
            serving.append(coordinator)
            status = coordinator.run()
            _log_sync_cost(channel)
        else:
            follower = Follower(engine, writer, channel, watchdog, args.stall_timeout, sync_steps)
            status = follower.run()
        return status
    except BrokenPipeError:
        log.warning("protocol pipe closed by the worker; exiting")
        return 1
    except KeyboardInterrupt:
        return 130


def _agree_on_prompt_cache(engine: Engine, group: mx.distributed.Group) -> None:
    """Give every rank's prefix cache the same capacity in tokens: the smallest any
    rank has (its node's --prompt-cache-bytes over its layers' bytes per token).
    Ranks that cache the same tokens make the same decisions (prefix_cache.py);
    each holds its own layers' part, within its own node's bound."""
    import mlx.core as mx

    offered = min(engine.prompt_cache.capacity_tokens, 2**31 - 1)  # int32 on the wire
    mine = mx.array([offered], dtype=mx.int32)
    every = mx.distributed.all_gather(mine, group=group, stream=mx.cpu)
    agreed = int(mx.min(every).item())
    engine.resize_prompt_cache(agreed)
    log.info("prefix cache: %d tokens on every rank (this rank offered %d)", agreed, offered)


def _sync_steps(spec: ShardSpec) -> bool:
    """Whether every step waits for the forward pass it queued before going on.

    BatchGenerator starts the next forward pass before a step returns, so the
    bookkeeping between steps (events, the exchange, building the next graph)
    normally overlaps with it. With tensor parallelism every rank computes at the
    same time, and ranks that share one machine's cores then run more busy threads
    than it has: the bookkeeping slows down the computation it overlaps with, and
    the ranks drift apart, so that one spins in each all_sum while the other
    catches up. Waiting for the forward pass first keeps the phases apart. Measured
    on this project's 2-core machine, 2 ranks on loopback: tensor ~280 against ~200
    tokens/s (7 against 10 ms of CPU per token). Pipeline stages compute one after
    the other, which leaves a core for the bookkeeping: they do better overlapping
    (~220-260 against ~190-225 tokens/s). Ranks on separate machines always overlap.
    EXO_TRIO_STEP_SYNC=1 or 0 overrides the choice.
    """
    from exo_trio.runner.layer_split import ranks_share_host

    forced = os.environ.get("EXO_TRIO_STEP_SYNC", "auto")
    if forced in ("0", "1"):
        return forced == "1"
    return spec.sharding == "tensor" and ranks_share_host(spec)


def _log_sync_cost(channel: LeaderChannel) -> None:
    if channel.exchanges:
        log.info(
            "step sync: %d exchanges (%d with commands), %.3f ms waiting for reports on average",
            channel.exchanges,
            channel.command_exchanges,
            1000 * channel.wait_seconds / channel.exchanges,
        )
