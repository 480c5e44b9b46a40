"""The shards this node runs: one supervised runner per instance it takes part in.

The leader says which (StartShard / StopShard); this module starts and stops the
Workers and reports their state back (ShardStatus) for the leader to rebuild its
instance table from. A single-rank instance's runner is restarted in place when it
dies; a rank of a multi-node instance is not (its group broke with it), it is
reported failed and the leader tears the instance down.

Every runner's events go up to `events`: the Router, which sets itself there when
it is built (router.py), so a Worker's `deliver` is the router's.

Before its runner starts, a shard may first have to get the model's files
(`prepare`: a hub model this node does not have, or not all of; exo_trio/
model_catalog.py fetches the files its layers need). Meanwhile it reports
"downloading" with its progress; if that fails, it reports "failed" with why. A
rank of a split model then reports "fetched" and waits until every rank has its
files (`group_fetched`, from the leader's view) before it starts its runner: a
rank's runner gives up joining its group after a minute, and another node's
download may take much longer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from exo_trio.cluster_messages import InstanceSpec, ShardState, ShardStatus
from exo_trio.hub_download import DownloadProgress
from exo_trio.observer import Observer
from exo_trio.worker import EventSink, Launcher, Worker

log = logging.getLogger(__name__)

LauncherFactory = Callable[[InstanceSpec, int], Launcher]
# Get a shard's model files before its runner starts; hands the download's
# progress (if there is one) to the callback.
Prepare = Callable[[InstanceSpec, int, Callable[[DownloadProgress], None]], Awaitable[object]]
# Whether every rank of an instance has its files (instance id -> bool).
GroupFetched = Callable[[str], bool]
# The window the shard's tokens/s is measured over (seconds).
RATE_WINDOW = 10.0
# How often a fetched rank looks whether the others have theirs.
GROUP_POLL = 0.25


@dataclass
class Shard:
    spec: InstanceSpec
    rank: int
    worker: Worker
    scope: trio.CancelScope
    stopped: bool = False
    preparing: bool = False
    waiting: bool = False  # has its files, waits for the other ranks'
    download: DownloadProgress | None = None
    error: str | None = None  # getting the model's files failed
    # (time, tokens, seconds generating), for tokens/s over the last RATE_WINDOW.
    samples: deque[tuple[float, int, float]] = field(default_factory=deque)

    @property
    def state(self) -> ShardState:
        if self.stopped:
            return "stopped"
        if self.error is not None:
            return "failed"
        if self.preparing:
            return "downloading"
        if self.waiting:
            return "fetched"
        worker_state = self.worker.state
        if worker_state == "ready":
            return "ready"
        if worker_state == "failed":
            return "failed"
        if worker_state in ("starting", "loading"):
            return "loading" if worker_state == "loading" else "starting"
        # "restarting" (single rank, coming back) or "stopped" (on the way out)
        return "loading" if self.spec.world_size == 1 else "failed"

    def status(self) -> ShardStatus:
        state = self.state
        download = self.download if state == "downloading" else None
        return ShardStatus(
            instance=self.spec,
            rank=self.rank,
            state=state,
            error=(self.error or self.worker.last_error) if state == "failed" else None,
            active_requests=len(self.worker.jobs),
            gave_up=self.worker.gave_up is not None,
            download_completed=download.completed if download is not None else 0,
            download_total=download.total if download is not None else 0,
            tokens_per_second=self.tokens_per_second(),
        )

    def tokens_per_second(self) -> float:
        """Tokens per second of generating, over the last RATE_WINDOW seconds (0
        when the runner generated nothing in that time)."""
        stats, now = self.worker.stats, trio.current_time()
        self.samples.append((now, stats.tokens, stats.generating_seconds))
        while len(self.samples) > 1 and self.samples[1][0] <= now - RATE_WINDOW:
            self.samples.popleft()
        _, tokens, seconds = self.samples[0]
        busy = stats.generating_seconds - seconds
        return (stats.tokens - tokens) / busy if busy > 0 else 0.0


class ShardManager:
    def __init__(
        self,
        launcher_for: LauncherFactory,
        *,
        events: EventSink | None = None,
        observer: Observer | None = None,
        restart_backoff: float = 0.5,
        prepare: Prepare | None = None,
        group_fetched: GroupFetched | None = None,
    ) -> None:
        self._launcher_for = launcher_for
        # Where the runners' events go up (the Router sets itself here).
        self.events = events
        self._observer = observer or Observer()
        self._restart_backoff = restart_backoff
        self._prepare = prepare
        self._group_fetched = group_fetched
        self.shards: dict[str, Shard] = {}
        self._nursery: trio.Nursery | None = None
        # Shutting down: the runners finish what they hold but take no new work
        # (`worker` answers None, so other nodes' new requests are refused).
        self.draining = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the shards run in; on the way out every shard stops."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, spec: InstanceSpec, rank: int) -> bool:
        """Start this node's rank of an instance (idempotent). Returns False if it
        was already running."""
        if spec.instance_id in self.shards or self._nursery is None:
            return False
        if self.events is None:
            raise RuntimeError("no router takes this node's runner events (ShardManager.events)")
        worker = Worker(
            self._launcher_for(spec, rank),
            self.events,
            restart=spec.world_size == 1,
            restart_backoff=self._restart_backoff,
            name=spec.instance_id,
            observer=self._observer,
        )
        shard = Shard(spec, rank, worker, trio.CancelScope())
        self.shards[spec.instance_id] = shard
        self._observer.shard_started(spec, rank)
        self._nursery.start_soon(self._supervise, shard)
        log.info(
            "starting rank %d/%d of instance %s (%s, layers %d:%d)",
            rank,
            spec.world_size,
            spec.instance_id,
            spec.model,
            spec.shards[rank].start_layer,
            spec.shards[rank].end_layer,
        )
        return True

    async def _supervise(self, shard: Shard) -> None:
        with shard.scope:
            if self._prepare is not None and not await self._prepared(shard):
                return  # failed: listed (so the leader learns of it) until stopped
            await shard.worker.run()
        # A failed shard stays listed (so the leader learns of it) until stopped.
        if shard.stopped:
            self.shards.pop(shard.spec.instance_id, None)

    async def _prepared(self, shard: Shard) -> bool:
        assert self._prepare is not None
        shard.preparing = True

        def watch(progress: DownloadProgress) -> None:
            shard.download = progress

        try:
            await self._prepare(shard.spec, shard.rank, watch)
        except Exception as exc:  # a HubError, or the network or disk failing
            shard.error = f"getting the model's files failed: {exc}"
            log.warning("instance %s: %s", shard.spec.instance_id, shard.error)
            return False
        finally:
            shard.preparing = False
        if shard.spec.world_size > 1 and self._group_fetched is not None:
            shard.waiting = True
            try:
                while not self._group_fetched(shard.spec.instance_id):
                    await trio.sleep(GROUP_POLL)
            finally:
                shard.waiting = False
        return True

    def stop(self, instance_id: str, reason: str) -> bool:
        shard = self.shards.get(instance_id)
        if shard is None:
            return False
        log.info("stopping instance %s: %s", instance_id, reason)
        shard.stopped = True
        shard.scope.cancel()
        if shard.worker.state == "failed" or shard.error is not None:
            # Its task already ended: nothing will remove it but us.
            self.shards.pop(instance_id, None)
        self._observer.shard_stopped(instance_id, reason)
        return True

    def worker(self, instance_id: str) -> Worker | None:
        shard = self.shards.get(instance_id)
        return None if shard is None or shard.stopped or self.draining else shard.worker

    def statuses(self) -> tuple[ShardStatus, ...]:
        return tuple(s.status() for s in self.shards.values())

    def workers(self) -> list[Worker]:
        """The runners of every shard this node holds (stopped ones on their way out
        included: their requests are still this node's)."""
        return [shard.worker for shard in self.shards.values()]
