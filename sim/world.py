"""The simulated cluster: real nodes, fake runners, simulated connections, clients.

Each SimNode is the production stack (StreamRegistry, Worker, Node, the
Quart-Trio app under hypercorn's trio TCPServer) with its effects swapped for the
simulator's: fake runners behind the Worker's launcher, in-memory pipes for the
runner and for every HTTP connection, seeded ids and wall clock, seeded fault
points. The World owns the nodes (a list, so a second node and the links between
them slot in later), the clients, the ledger and the runner faults, and runs one
scenario: faults early, then healthy running, the horizon, and a drain.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from exo_trio.api.app import ApiSettings, create_app
from exo_trio.framing import encode_frame
from exo_trio.node import ModelCard, Node
from exo_trio.runner_protocol import Loading
from exo_trio.seams import Seams
from exo_trio.streams import StreamRegistry
from exo_trio.types import ChunkGenerated, GenerationEvent
from exo_trio.worker import Worker
from sim.choices import Choices
from sim.clients import Client, ClientResult
from sim.encoder import SimEncoder
from sim.fake_runner import FakeRunner
from sim.faults import SimFaultPoints, link_shaper
from sim.ledger import Ledger
from sim.pipes import PipeEnd, pipe_pair
from sim.scenario import ClientPlan, Plan
from sim.trace import Trace

MODEL = "sim"
EPOCH = 1_700_000_000.0


def token_text(seq: int, token: int) -> str:
    """What the fake runner says for a token: names its sequence number, so a
    client-side gap or duplicate is visible in the text itself."""
    return f"[{seq}:{token}]"


@dataclass
class RunnerHandle:
    runner: FakeRunner
    end: PipeEnd  # the runner's end of its pipe
    scope: trio.CancelScope
    node: int
    crashed: bool = False
    done: bool = False


@dataclass
class SimConnection:
    """The Worker's RunnerConnection to a fake runner."""

    stream: PipeEnd
    pid: int | None = None

    async def aclose(self) -> None:
        self.stream.close()
        await trio.lowlevel.checkpoint()


class SimNode:
    """One node: the production registry, worker, node and app, with a fake
    runner behind the worker and hypercorn serving simulated connections."""

    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.index = index
        scenario = world.plan.scenario
        self.registry = StreamRegistry()
        self.worker = Worker(
            self._launch,
            self._deliver,
            restart_backoff=scenario.restart_backoff,
            max_backoff=scenario.restart_backoff * 4,
        )
        self._ids = 0
        seams = Seams(wall_clock=world.wall_clock, new_id=self._new_id, faults=world.faults)
        self.node = Node(
            model=ModelCard(id=MODEL, context_length=scenario.context_length, created=int(EPOCH)),
            encoder=SimEncoder(),
            worker=self.worker,
            registry=self.registry,
            seams=seams,
        )
        settings = ApiSettings(
            keepalive_interval=world.plan.keepalive, max_queued=world.plan.max_queued
        )
        self.app = create_app(self.node, settings)
        self.config = hypercorn_config()
        self.asgi = wrap_app(self.app, self.config.wsgi_max_body_size, None)
        self.context = WorkerContext(None)
        self.lifespan_state: dict[str, Any] = {}
        self.connections = 0
        self.server_ends: list[PipeEnd] = []
        self._nursery: trio.Nursery | None = None

    def _deliver(self, event: GenerationEvent) -> object:
        """The worker's delivery callback: the registry's, plus a look at whether a
        first chunk arrives before anyone waits on its channel (the window in
        which exo lost tokens)."""
        if isinstance(event, ChunkGenerated) and event.seq == 0:
            entry = getattr(self.registry, "_entries", {}).get(event.request_id)
            receive = getattr(getattr(entry, "stream", None), "_receive", None)
            if receive is not None and receive.statistics().tasks_waiting_receive == 0:
                self.world.coverage["chunk_before_consumer_read"] += 1
        return self.registry.deliver(event)

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-n{self.index}r{self._ids}"

    def routes(self, method: str | None = None) -> list[str]:
        return [
            rule.rule
            for rule in self.app.url_map.iter_rules()
            if method is None or method in (rule.methods or ())
        ]

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            lifespan = Lifespan(self.asgi, self.config, self.lifespan_state)
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            nursery.start_soon(self.worker.run)
            await self.worker.wait_ready()
            task_status.started()

    # ---- runners ----

    async def _launch(self) -> SimConnection:
        world = self.world
        faults = world.plan.faults
        index = len(world.runners)
        shape = [
            link_shaper(
                world.choices,
                faults.window,
                faults.pipe_delay_p,
                faults.pipe_split_p,
                world.plan.scenario.pipe_delay_max,
            )
            for _ in range(2)
        ]
        ours, theirs = pipe_pair(shaper_ab=shape[0], shaper_ba=shape[1])
        runner = FakeRunner(
            theirs,
            model=MODEL,
            step_delay=world.step_delay,
            context_length=world.plan.scenario.context_length,
            max_batch=world.plan.max_batch,
            text_of=token_text,
            observer=world.ledger,
            index=index,
        )
        handle = RunnerHandle(runner, theirs, trio.CancelScope(), self.index)
        world.runners.append(handle)
        world.trace.add("launch", self.index, index)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_runner, handle)
        await trio.lowlevel.checkpoint()
        return SimConnection(ours)

    async def _run_runner(self, handle: RunnerHandle) -> None:
        with handle.scope:
            try:
                await handle.runner.run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the worker closed the pipe under it: a normal stop
        handle.done = True
        handle.runner.died()
        self.world.ledger.runner_died(handle.runner.index)
        handle.end.close()

    # ---- HTTP ----

    def connect(self, client: ClientPlan) -> PipeEnd:
        """A new HTTP connection to this node; hypercorn serves the far end."""
        world = self.world
        faults = world.plan.faults
        delay = world.plan.scenario.http_delay_max
        self.connections += 1
        client_end, server_end = pipe_pair(
            capacity_ba=client.recv_capacity,
            shaper_ab=link_shaper(
                world.choices, faults.window, faults.http_delay_p, faults.http_split_p, delay
            ),
            shaper_ba=link_shaper(
                world.choices, faults.window, faults.http_delay_p, faults.http_split_p, delay
            ),
            address_a=("10.1.0.2", 40000 + self.connections),
            address_b=(f"10.0.0.{self.index + 1}", 52415),
        )
        self.server_ends.append(server_end)
        server = TCPServer(
            self.asgi,
            self.config,
            self.context,
            ConnectionState(self.lifespan_state.copy()),
            server_end,  # type: ignore[arg-type]
        )
        assert self._nursery is not None
        self._nursery.start_soon(server.run)
        return client_end


def hypercorn_config() -> HypercornConfig:
    config = HypercornConfig()
    config.include_date_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    return config


@dataclass
class EndState:
    """What is left after the drain, per node and overall."""

    registry_open: dict[int, list[str]] = field(default_factory=dict)
    worker_jobs: dict[int, list[str]] = field(default_factory=dict)
    runner_active: dict[int, list[str]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    stats: dict[int, dict[str, int]] = field(default_factory=dict)


class World:
    def __init__(self, plan: Plan, choices: Choices, trace: Trace) -> None:
        self.plan = plan
        self.choices = choices
        self.trace = trace
        self.faults = SimFaultPoints(choices, plan.faults, trace, plan.scenario.point_delay_max)
        self.ledger = Ledger(trace, self._on_step)
        self.runners: list[RunnerHandle] = []
        self.nodes = [SimNode(self, i) for i in range(plan.scenario.nodes)]
        self.results = [ClientResult(c) for c in plan.clients]
        self.coverage: Counter[str] = Counter()
        self.end_state: EndState | None = None
        self.clients_done_at: float | None = None
        self._root: trio.Nursery | None = None
        self._aux: trio.Nursery | None = None
        self._main_task: trio.lowlevel.Task | None = None

    # ---- seams ----

    @staticmethod
    def wall_clock() -> float:
        return EPOCH + trio.current_time()

    def step_delay(self) -> float:
        low, high = self.plan.scenario.step_delay
        return self.choices.between(low, high)

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a helper task (a cancel request, a delayed fault) until the horizon."""
        assert self._aux is not None
        self._aux.start_soon(fn, *args)

    # ---- the run ----

    async def main(self) -> None:
        scenario = self.plan.scenario
        self._main_task = trio.lowlevel.current_task()
        async with trio.open_nursery() as root:
            self._root = root
            for node in self.nodes:
                await root.start(node.run)
            self.trace.add("ready")
            with trio.move_on_at(scenario.horizon):
                async with trio.open_nursery() as aux:
                    self._aux = aux
                    async with trio.open_nursery() as clients:
                        for plan, result in zip(self.plan.clients, self.results, strict=True):
                            clients.start_soon(Client(self, plan, result).run)
                    self.clients_done_at = trio.current_time()
                    aux.cancel_scope.cancel()
            await trio.sleep(scenario.drain)
            self.end_state = self._end_state()
            root.cancel_scope.cancel()

    def _end_state(self) -> EndState:
        state = EndState()
        for node in self.nodes:
            state.registry_open[node.index] = node.registry.open_ids()
            state.worker_jobs[node.index] = sorted(node.worker.jobs)
            stats = node.registry.stats
            state.stats[node.index] = {
                "unknown_events": stats.unknown_events,
                "after_terminal": stats.after_terminal,
                "overflows": stats.overflows,
                "late_events": stats.late_events,
            }
        for handle in self.runners:
            if not handle.done and handle.runner.active:
                state.runner_active[handle.runner.index] = sorted(handle.runner.active)
        state.tasks = leftover_tasks(self._main_task)
        for node in self.nodes:
            in_flight = node.node.metrics.registry.get_sample_value("exo_trio_requests_in_flight")
            state.stats[node.index]["admission_in_flight"] = int(in_flight or 0)
            self.coverage["late_events"] += node.registry.stats.late_events
            self.coverage["server_backpressure"] += sum(
                1 for end in node.server_ends if end.sent_stats.blocked_writes
            )
        return state

    # ---- runner faults ----

    def _on_step(self, runner: FakeRunner) -> None:
        plan = self.plan.runner
        steps = self.ledger.steps
        if trio.current_time() >= self.plan.faults.window:
            return
        handle = self.runners[runner.index]
        if steps in plan.crash_steps and not handle.crashed:
            self._root_spawn(self._crash_later, handle, plan.crash_delay)
        if steps == plan.hang_step:
            self.trace.add("hang", runner.index)
            runner.hang()
            self._root_spawn(self._resume_later, handle, plan.hang_for)

    def _root_spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._root is not None
        self._root.start_soon(fn, *args)

    async def _crash_later(self, handle: RunnerHandle, delay: float) -> None:
        await trio.sleep(delay)
        if handle.done or handle.crashed:
            return
        handle.crashed = True
        active = [j for j in self.ledger.jobs.values() if j.runner == handle.runner.index]
        if any(j.end is None and j.tokens for j in active):
            self.coverage["runner_crash_mid_stream"] += 1
        self.coverage["runner_crash"] += 1
        self.trace.add("crash", handle.runner.index, self.plan.runner.torn)
        if self.plan.runner.torn:
            frame = encode_frame(Loading(fraction=0.5, phase="torn"))
            handle.end.write_now(frame[: len(frame) // 2])
        handle.scope.cancel()

    async def _resume_later(self, handle: RunnerHandle, delay: float) -> None:
        await trio.sleep(delay)
        self.trace.add("resume", handle.runner.index)
        handle.runner.resume()

    # ---- clients tell it ----

    def client_left(self, plan: ClientPlan, result: ClientResult) -> None:
        jobs = self.ledger.by_client.get(plan.index, [])
        running = any(j.end is None for j in jobs)
        if result.terminals:
            self.coverage["disconnect_after_last"] += 1
        elif result.pieces and running:
            self.coverage["disconnect_mid_stream"] += 1
        elif not result.pieces:
            self.coverage["disconnect_before_first"] += 1


# Tasks that live as long as their node (or Trio itself) and are not leftovers.
_SERVICE_TASKS = frozenset(
    {
        "World.main",
        "SimNode.run",
        "SimNode._run_runner",
        "FakeRunner._steps",
        "Worker.run",
        "Worker._write_commands",
        "Lifespan.handle_lifespan",
        "TrioASGILifespan.__call__",
        "run_sim",
    }
)


def leftover_tasks(main: trio.lowlevel.Task | None) -> list[str]:
    """Names of live tasks under `main` that are not long-lived services (after the
    drain there must be none: no connection, request handler or helper left)."""
    left: list[str] = []
    if main is None:
        return left
    stack = list(main.child_nurseries)
    while stack:
        nursery = stack.pop()
        for task in nursery.child_tasks:
            stack.extend(task.child_nurseries)
            if task is trio.lowlevel.current_task():
                continue
            name = getattr(task.coro, "__qualname__", task.name)
            if name in _SERVICE_TASKS or name.startswith("trio."):
                continue
            if "<locals>" in name or name.startswith("_"):
                name = task.name
            if name not in _SERVICE_TASKS:
                left.append(name)
    return sorted(left)
