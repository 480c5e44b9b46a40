"""The simulated cluster: real nodes, fake runners, simulated connections, clients.

Each SimNode is built by `exo_trio/assembly.py::build_node`, as the daemon builds
its node: StreamRegistry, Router (with its TokenRelay), ShardManager, Cluster,
PeerMessages, PeerLinks to every other node, the Node, and the Quart-Trio app
served by api/serving.py (hypercorn, with the send timeout). Only the effects are
the simulator's: the links' listener and connector (sim/net.py), the API's
listener (in-memory connections), the shard launchers (fake runners on in-memory
pipes, one per rank, joined in a RunnerGroup), seeded ids, nonces, jitter and wall
clock, seeded fault points, a trivial prompt encoder, and the observer
(sim/observe.py) through which the simulator watches the node.

The World owns the nodes (one per index; a crashed node is replaced by a fresh
incarnation with the same id when it restarts), the network, the clients, the
ledger and the faults, and runs one scenario: start-up until the cluster serves,
then faults early, healthy running, the horizon, and a drain.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig

from exo_trio.api.serving import Bound
from exo_trio.api.settings import ApiSettings
from exo_trio.assembly import LinkSetup, NodeEffects, NodeSetup, build_node
from exo_trio.cluster import ClusterSettings
from exo_trio.cluster_messages import ClusterMessage, InstanceSpec, ModelInfo
from exo_trio.cluster_state import Vote
from exo_trio.net.wire import AdvertisedAddress
from exo_trio.node import ModelCard, ServedModel
from exo_trio.runner.framing import encode_frame
from exo_trio.runner.protocol import Loading
from exo_trio.seams import FaultPoints, Seams
from exo_trio.worker import Launcher
from sim.choices import Choices
from sim.clients import Client, ClientResult
from sim.encoder import SimEncoder
from sim.fake_runner import FakeRunner, RunnerGroup
from sim.faults import SimFaultPoints, Window, link_shaper
from sim.ledger import Ledger
from sim.net import LINK_PORT, SimListener, SimNetwork, host_of
from sim.observe import SimObserver
from sim.pipes import PipeEnd, pipe_pair
from sim.scenario import ClientPlan, ClusterFault, NodeSettings, Plan, Scenario
from sim.trace import Trace
from sim.watch import ClusterWatch, index_of_node

MODEL = "sim"
EPOCH = 1_700_000_000.0
CLUSTER_ID = "exo-trio-sim"
SECRET = b"the simulated cluster's secret"
MODEL_INFO = ModelInfo(
    id=MODEL,
    size_bytes=64 << 20,
    n_layers=8,
    n_heads=4,
    n_kv_heads=2,
    supports_tensor=True,
    context_length=4096,
)
MEMORY = 16 << 30
FREE_PORTS = (61000, 61001, 61002, 61003)
# How long start-up (links, leader, placement, runners loading) may take, and
# recovery after the faults (a restarted leader alone waits 10 s to settle).
STARTUP_LIMIT = 30.0
RECOVERY_LIMIT = 20.0
# How often the drain looks whether anything is left.
DRAIN_POLL = 0.25


def node_id_of(index: int) -> str:
    return f"n{index}"


def token_text(seq: int, token: int) -> str:
    """What the fake runner says for a token: names its sequence number, so a
    client-side gap or duplicate is visible in the text itself."""
    return f"[{seq}:{token}]"


class ChoiceRandom(random.Random):
    """A random.Random whose draws come from the choice list (the links' backoff
    jitter), so they are recorded, replayed and shrunk with everything else."""

    def __init__(self, choices: Choices) -> None:
        super().__init__(0)
        self._choices = choices

    def random(self) -> float:
        return self._choices.draw(1000) / 1000


@dataclass
class RunnerHandle:
    runner: FakeRunner
    end: PipeEnd  # the runner's end of its pipe
    scope: trio.CancelScope
    node: SimNode
    crashed: bool = False
    done: bool = False
    death: str | None = None  # "process" or "machine" when it was killed


@dataclass
class SimConnection:
    """The Worker's RunnerConnection to a fake runner."""

    stream: PipeEnd
    pid: int | None = None

    async def aclose(self) -> None:
        self.stream.close()
        await trio.lowlevel.checkpoint()


class SimNode:
    """One node, built by `assembly.build_node` as the daemon builds it, with the
    simulator's effects."""

    def __init__(self, world: World, index: int, incarnation: int) -> None:
        self.world = world
        self.index = index
        self.incarnation = incarnation
        self.node_id = node_id_of(index)
        plan = world.plan
        scenario = plan.scenario
        n = scenario.nodes
        host = host_of(index)
        self._ids = 0
        self._tokens = 0
        self.connections = 0
        self.server_ends: list[PipeEnd] = []
        self.scope = trio.CancelScope()
        self.crashed = False
        self.crashed_at: float | None = None
        self._nursery: trio.Nursery | None = None
        self._incoming: trio.MemorySendChannel[trio.abc.Stream] | None = None
        self.observer = SimObserver(world, self)
        self.parts = build_node(
            NodeSetup(
                node_id=self.node_id,
                host=host,
                served=[
                    ServedModel(
                        ModelCard(
                            id=MODEL, context_length=scenario.context_length, created=int(EPOCH)
                        ),
                        SimEncoder(),
                    )
                ],
                models={MODEL: MODEL_INFO},
                serve=(MODEL,) if plan.cluster.serve[index] else (),
                api=api_settings(plan.settings, scenario),
                cluster=ClusterSettings(auto_place=True, expected_peers=n - 1, settle=10.0),
                ack_every=plan.settings.ack_every,
                relay_buffer=plan.settings.relay_buffer,
                links=LinkSetup(
                    cluster_id=CLUSTER_ID,
                    secret=SECRET,
                    listen_host=host,
                    listen_port=LINK_PORT,
                    peers=[(host_of(j), LINK_PORT) for j in range(n) if j != index],
                    advertise=[AdvertisedAddress(host, LINK_PORT, "sim0", "private")],
                ),
                http=hypercorn_config(scenario.http_keepalive_timeout),
            ),
            NodeEffects(
                launcher_for=self._launcher_for,
                seams=Seams(
                    wall_clock=world.wall_clock,
                    new_id=self._new_id,
                    faults=NodeFaults(world, self),
                    observer=self.observer,
                ),
                listen_api=self._listen_api,
                link_connector=world.net.connector_for(index),
                link_listener=world.net.listener_for(index),
                token_bytes=self._token_bytes,
                rng=ChoiceRandom(world.choices),
                memory_free=lambda: MEMORY,
                free_ports=lambda: FREE_PORTS,
                # The node's disk: its last grant survives a crash, as the daemon's
                # vote.json does.
                remembered_vote=world.votes.get(self.node_id),
                remember_vote=lambda vote: world.votes.__setitem__(self.node_id, vote),
            ),
        )
        self.registry = self.parts.registry
        self.router = self.parts.router
        self.shards = self.parts.shards
        self.cluster = self.parts.cluster
        self.links = self.parts.links
        self.node = self.parts.node
        self.app = self.parts.app

    # ---- seams ----

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self.node_id}i{self.incarnation}r{self._ids}"

    def _token_bytes(self, n: int) -> bytes:
        """Nonces and the link incarnation: unique, and the same in every replay."""
        self._tokens += 1
        seed = f"{self.node_id}/{self.incarnation}/{self._tokens}".encode()
        return hashlib.shake_128(seed).digest(n)

    async def _listen_api(self, config: object) -> list[Bound]:
        """The API's listener: accepts the connections `connect` makes."""
        send, receive = trio.open_memory_channel[trio.abc.Stream](math.inf)
        self._incoming = send
        await trio.lowlevel.checkpoint()
        return [(SimListener(receive), f"http://{host_of(self.index)}:52415")]

    def inject(self, sender: str, message: ClusterMessage) -> None:
        """A message arrives as if from `sender` (a delayed one the network held)."""
        self.parts.messages.receive(sender, message)

    def routes(self, method: str | None = None) -> list[str]:
        return [
            rule.rule
            for rule in self.app.url_map.iter_rules()
            if method is None or method in (rule.methods or ())
        ]

    # ---- life ----

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.parts.run)
                self.world.trace.add("node-up", self.node_id, self.incarnation)
                task_status.started()

    def crash(self, mode: str) -> None:
        """The node dies at once: its task tree and runners with it, its links cut
        (or silent, for a machine), its HTTP connections closed."""
        self.crashed = True
        self.crashed_at = trio.current_time()
        self.world.net.crash(self.index, mode)  # type: ignore[arg-type]
        for end in self.server_ends:
            end.close()
        for handle in self.world.runners:
            if handle.node is self and not handle.done:
                handle.death = mode
        self.scope.cancel()

    # ---- runners ----

    def _launcher_for(self, spec: InstanceSpec, rank: int) -> Launcher:
        world = self.world
        world.specs.setdefault(spec.instance_id, spec)
        group = world.group_for(spec)

        async def launch() -> SimConnection:
            faults = world.plan.faults
            index = len(world.runners)
            shape = [
                link_shaper(
                    world.choices,
                    world.window,
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
                group=group,
                rank=rank,
                detect_delay=world.group_detect_delay,
                prompt_cache_tokens=world.plan.scenario.prompt_cache_tokens,
                prefill_seconds_per_token=world.plan.scenario.prefill_seconds_per_token,
            )
            handle = RunnerHandle(runner, theirs, trio.CancelScope(), self)
            world.runners.append(handle)
            world.trace.add("launch", self.node_id, index, spec.instance_id, rank)
            assert self._nursery is not None
            self._nursery.start_soon(self._run_runner, handle)
            await trio.lowlevel.checkpoint()
            return SimConnection(ours)

        return launch

    async def _run_runner(self, handle: RunnerHandle) -> None:
        try:
            with handle.scope:
                try:
                    await handle.runner.run()
                except* (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the worker closed the pipe under it: a normal stop
        finally:
            handle.done = True
            group = handle.runner.group
            if group is not None:
                if handle.death == "machine":
                    group.stall(math.inf)  # its peers hear nothing, ever
                else:
                    group.break_(f"rank {handle.runner.rank} exited")
            handle.runner.died()
            self.world.ledger.runner_died(handle.runner.index)
            handle.end.close()

    # ---- HTTP ----

    def connect(self, client: ClientPlan) -> PipeEnd:
        """A new HTTP connection to this node's API (api/serving.py serves it)."""
        world = self.world
        faults = world.plan.faults
        delay = world.plan.scenario.http_delay_max
        self.connections += 1
        client_end, server_end = pipe_pair(
            capacity_ba=client.recv_capacity,
            shaper_ab=link_shaper(
                world.choices, world.window, faults.http_delay_p, faults.http_split_p, delay
            ),
            shaper_ba=link_shaper(
                world.choices, world.window, faults.http_delay_p, faults.http_split_p, delay
            ),
            address_a=("10.1.0.2", 40000 + self.connections),
            address_b=(host_of(self.index), 52415),
        )
        if self.crashed or self._incoming is None:
            server_end.close()  # nothing listens: the connection is refused
            return client_end
        self.server_ends.append(server_end)
        world.connection_client[id(server_end)] = client.index
        self._incoming.send_nowait(server_end)
        return client_end

    def open_connections(self) -> int:
        """HTTP connections the server has not closed yet."""
        return sum(1 for end in self.server_ends if not end.closed)


def hypercorn_config(keep_alive_timeout: float = 5.0) -> HypercornConfig:
    config = HypercornConfig()
    config.include_date_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = keep_alive_timeout
    return config


def api_settings(settings: NodeSettings, scenario: Scenario) -> ApiSettings:
    """The nodes' API settings for a run (a 0 in the plan: production's default)."""
    defaults = ApiSettings()
    return ApiSettings(
        keepalive_interval=settings.keepalive,
        max_queued=settings.max_queued,
        max_body_bytes=scenario.max_body_bytes,
        api_key=settings.api_key,
        ttft_timeout=settings.ttft_timeout or defaults.ttft_timeout,
        idle_timeout=settings.idle_timeout or defaults.idle_timeout,
        request_timeout=settings.request_timeout or defaults.request_timeout,
        send_timeout=settings.send_timeout or defaults.send_timeout,
    )


class NodeFaults(FaultPoints):
    """One node's fault points: the world's, knowing which node they are in (a
    link cut after a message needs the sender)."""

    def __init__(self, world: World, node: SimNode) -> None:
        self.world = world
        self.node = node

    async def hit(self, name: str, request_id: str | None = None) -> None:
        await self.world.faults.hit(name, request_id)

    def fire(self, name: str, *context: object) -> bool:
        if not self.world.faults.fire(name, *context):
            return False
        return self.world.buggified(self.node, name, context)


@dataclass
class EndState:
    """What is left after the drain, per surviving node and overall."""

    registry_open: dict[int, list[str]] = field(default_factory=dict)
    worker_jobs: dict[int, list[str]] = field(default_factory=dict)
    runner_active: dict[int, list[str]] = field(default_factory=dict)
    relay_routes: dict[int, list[str]] = field(default_factory=dict)
    relay_outgoing: dict[int, list[str]] = field(default_factory=dict)
    shards: dict[int, list[str]] = field(default_factory=dict)
    connections: dict[int, int] = field(default_factory=dict)  # HTTP, still open
    serving: bool = True
    tasks: list[str] = field(default_factory=list)
    stats: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """Nothing left anywhere (what the drain waits for)."""
        leftovers = (
            self.registry_open,
            self.worker_jobs,
            self.runner_active,
            self.relay_routes,
            self.relay_outgoing,
            self.shards,
            self.connections,
        )
        if any(any(v for v in part.values()) for part in leftovers) or self.tasks:
            return False
        counters = ("unknown_events", "after_terminal", "overflows", "admission_in_flight")
        return self.serving and not any(s[k] for s in self.stats.values() for k in counters)


class World:
    def __init__(self, plan: Plan, choices: Choices, trace: Trace) -> None:
        self.plan = plan
        self.choices = choices
        self.trace = trace
        self.window = Window(plan.faults.window)
        self.faults = SimFaultPoints(
            choices,
            plan.faults,
            self.window,
            trace,
            plan.scenario.point_delay_max,
            plan.swarm.buggify,
            plan.buggify_p,
        )
        self.ledger = Ledger(trace, self._on_step)
        self.watch = ClusterWatch(self)
        self.net = SimNetwork(self)
        self.runners: list[RunnerHandle] = []
        self.groups: dict[str, RunnerGroup] = {}
        self.votes: dict[str, Vote] = {}  # per node id: what its disk holds
        self.specs: dict[str, InstanceSpec] = {}
        self.connection_client: dict[int, int] = {}  # HTTP connections (server end) by client
        self.nodes = [SimNode(self, i, 0) for i in range(plan.scenario.nodes)]
        self.retired: list[SimNode] = []  # crashed incarnations
        self.results = [ClientResult(c) for c in plan.clients]
        self.coverage: Counter[str] = Counter()
        # Errors clients got, by kind, and what explained them (the invariants').
        self.error_kinds: Counter[str] = Counter()
        self.explained: Counter[str] = Counter()
        self.leader_changes_at: list[float] = []
        self.end_state: EndState | None = None
        self.clients_done_at: float | None = None
        self.t0: float | None = None  # when the cluster first served (the window opens)
        self.startup_failed = False
        self.ending = False
        self.drained_at: float | None = None
        self.relay_stats: list[tuple[str, Any]] = []
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

    def group_detect_delay(self) -> float:
        return self.choices.between(0.0, self.plan.scenario.group_detect_max)

    def group_for(self, spec: InstanceSpec) -> RunnerGroup | None:
        if spec.world_size == 1:
            return None
        group = self.groups.get(spec.instance_id)
        if group is None:
            group = RunnerGroup(spec.instance_id, tuple(s.node_id for s in spec.shards))
            self.groups[spec.instance_id] = group
        return group

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
            with trio.move_on_after(STARTUP_LIMIT):
                while not self.serving():
                    await trio.sleep(0.05)
            if not self.serving():
                self.startup_failed = True
                self.ending = True
                root.cancel_scope.cancel()
                return
            self.t0 = trio.current_time()
            self.window.open(self.t0)
            self.trace.add("ready")
            with trio.move_on_at(self.t0 + scenario.horizon):
                async with trio.open_nursery() as aux:
                    self._aux = aux
                    faults_done = trio.Event()
                    aux.start_soon(self._cluster_faults, faults_done)
                    async with trio.open_nursery() as clients:
                        for plan, result in zip(self.plan.clients, self.results, strict=True):
                            clients.start_soon(Client(self, plan, result).run)
                    self.clients_done_at = trio.current_time()
                    await faults_done.wait()
                    aux.cancel_scope.cancel()
            # The cluster recovers by itself: a restarted node rejoins, a lost
            # instance is placed again (a restarted leader first waits for its
            # peers to settle); then the drain.
            with trio.move_on_after(RECOVERY_LIMIT):
                while not self.serving():
                    await trio.sleep(0.25)
            # The drain: until nothing is left, or `drain` seconds. Every client is
            # done and every fault healed by now, so what is clean stays clean, and
            # what leaks still leaks at the end.
            deadline = trio.current_time() + scenario.drain
            while trio.current_time() < deadline:
                await trio.sleep(min(DRAIN_POLL, deadline - trio.current_time()))
                if self._end_state().clean:
                    break
            self.drained_at = trio.current_time()
            self.end_state = self._end_state()
            self._count_end()
            self.ending = True
            # Pull the plug: every connection between nodes resets, so the links'
            # goodbyes fail at once instead of waiting out their grace.
            for conn in self.net.connections:
                conn.client.reset()
            root.cancel_scope.cancel()

    def serving(self) -> bool:
        """Every live node can serve the model (vacuously true when no live node
        was started to serve it: then nothing places it, by design)."""
        live = [node for node in self.nodes if not node.crashed]
        if not any(self.plan.cluster.serve[node.index] for node in live):
            return True
        return all(self._serves(node) for node in live)

    def _serves(self, node: SimNode) -> bool:
        """The node sees a ready instance that really is alive (a view can lag)."""
        return any(self.instance_alive(s.spec) for s in node.router.ready_instances(MODEL))

    def instance_alive(self, spec: InstanceSpec) -> bool:
        """Ground truth: every rank runs, on the current incarnation of its node, in
        a group that is neither broken nor waiting for a vanished machine."""
        group = self.groups.get(spec.instance_id)
        if group is not None and (
            group.broken is not None or not group.ever_formed or group.stalled_until == math.inf
        ):
            return False
        for shard in spec.shards:
            node = self.nodes[index_of_node(shard.node_id)]
            worker = node.shards.worker(spec.instance_id)
            if node.crashed or worker is None or worker.state != "ready":
                return False
        return True

    def _end_state(self) -> EndState:
        state = EndState()
        live = [node for node in self.nodes if not node.crashed]
        for node in live:
            i = node.index
            registry = node.registry.statistics()
            relay = node.router.statistics().relay
            # The registry's channels, and the node's handles and client ids.
            state.registry_open[i] = sorted({*registry.open_ids, *node.node.open_ids()})
            jobs = [rid for worker in node.shards.workers() for rid in worker.statistics().jobs]
            state.worker_jobs[i] = sorted(jobs)
            state.relay_routes[i] = sorted(relay.routes)
            state.relay_outgoing[i] = sorted(relay.outgoing)
            state.shards[i] = self._stray_shards(node)
            state.connections[i] = node.open_connections()
            state.stats[i] = {
                "unknown_events": registry.unknown_events,
                "after_terminal": registry.after_terminal,
                "overflows": registry.overflows,
                "late_events": registry.late_events,
            }
        for handle in self.runners:
            if not handle.done and handle.runner.active:
                state.runner_active[handle.runner.index] = sorted(handle.runner.active)
        state.serving = self.serving()
        state.tasks = leftover_tasks(self._main_task)
        for node in live:
            in_flight = node.node.metrics.registry.get_sample_value("exo_trio_requests_in_flight")
            state.stats[node.index]["admission_in_flight"] = int(in_flight or 0)
        return state

    def _count_end(self) -> None:
        live = [node for node in self.nodes if not node.crashed]
        for node in [*self.retired, *live]:
            self.coverage["late_events"] += node.registry.statistics().late_events
            self.coverage["server_backpressure"] += sum(
                1 for end in node.server_ends if end.sent_stats.blocked_writes
            )
            routed = node.router.statistics()
            relay = routed.relay
            self.relay_stats.append((f"{node.node_id}i{node.incarnation}", relay))
            coverage = self.coverage
            coverage["relay_resent"] += relay.resent
            coverage["relay_duplicates"] += relay.duplicates
            coverage["relay_ack_before_end"] += relay.acks
            coverage["relay_ack_trim"] += relay.trims
            coverage["relay_overflow"] += relay.overflows
            coverage["relay_unrouted_events"] += relay.unrouted
            coverage["relay_resume_unknown"] += relay.resume_unknown
            coverage["dispatch_refused"] += routed.refused
            coverage["remote_refused"] += routed.remote_refused
            coverage["peer_lost_for_good"] += routed.peers_lost
            coverage["remote_cancel_applied"] += routed.cancels_here
            coverage["runner_restart"] += sum(w.stats.restarts for w in node.shards.workers())
        for handle in self.runners:
            self.coverage["prompt_cache_hit"] += handle.runner.cache_hits
            self.coverage["burst_start"] += handle.runner.burst_starts

    def _stray_shards(self, node: SimNode) -> list[str]:
        """Shards a surviving node still holds that are not part of a ready
        instance whose every rank is alive: stopped, failed, or orphaned."""
        view = node.cluster.view
        ready = (
            {s.spec.instance_id for s in view.instances if s.state == "ready"} if view else set()
        )
        stray = []
        for instance_id, shard in node.shards.shards.items():
            group = self.groups.get(instance_id)
            broken = group is not None and group.broken is not None
            if shard.stopped or shard.state == "failed" or broken or instance_id not in ready:
                stray.append(f"{instance_id} rank {shard.rank} ({shard.state})")
        return stray

    # ---- cluster faults ----

    async def _cluster_faults(self, done: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            for fault in self.plan.cluster.faults:
                nursery.start_soon(self._fault, fault)
        done.set()

    async def _fault(self, fault: ClusterFault) -> None:
        assert self.t0 is not None
        await trio.sleep_until(self.t0 + fault.at)
        now = trio.current_time()
        watch = self.watch
        if fault.kind == "crash":
            node = self.nodes[fault.a]
            if node.crashed:
                return
            self.trace.add("crash-node", node.node_id, fault.mode, f"{fault.duration:.3f}")
            if self._streaming_through({fault.a}):
                self.coverage["node_crash_mid_stream"] += 1
            self.coverage[f"node_crash_{fault.mode}"] += 1
            if node.node_id == node.cluster.leader:
                self.coverage["leader_crash"] += 1
            watch.disturbed("crash", frozenset({fault.a}), now, now + fault.duration)
            node.crash(fault.mode)
            self.retired.append(node)
            if fault.duration == math.inf:
                return
            await trio.sleep(fault.duration)
            fresh = SimNode(self, fault.a, node.incarnation + 1)
            self.nodes[fault.a] = fresh
            self.trace.add("restart-node", fresh.node_id, fresh.incarnation)
            assert self._root is not None
            self._root.start_soon(fresh.run)
            return
        pair = frozenset({fault.a, fault.b})
        cut_streams = self._streaming_through(pair, both=True)
        if fault.kind == "reset":
            count = self.net.reset(fault.a, fault.b)
            self.trace.add("reset-link", fault.a, fault.b, count)
            watch.disturbed("reset", pair, now, now)
            self.coverage["link_reset"] += 1
            if cut_streams:
                self.coverage["link_cut_mid_stream"] += 1
            return
        until = now + fault.duration
        count = self.net.partition(fault.a, fault.b, until, fault.mode)  # type: ignore[arg-type]
        self.trace.add("partition", fault.a, fault.b, fault.mode, f"{fault.duration:.3f}", count)
        watch.disturbed("partition", pair, now, until)
        self.coverage[f"partition_{fault.mode}"] += 1
        if cut_streams:
            self.coverage["link_cut_mid_stream"] += 1
        ids = {node_id_of(fault.a), node_id_of(fault.b)}
        for group in self.groups.values():
            if group.broken is None and ids <= set(group.nodes):
                # The ranks' own connections cross the same cut.
                if fault.mode == "reset":
                    group.break_(f"network between {sorted(ids)} cut")
                else:
                    group.stall(until)
        await trio.sleep_until(until)
        self.trace.add("heal", fault.a, fault.b)

    def _streaming_through(self, nodes: frozenset[int] | set[int], both: bool = False) -> bool:
        """Is a request mid-stream whose path runs through these nodes (or, with
        `both`, through both ends of this link)?"""
        for rid, path in self.watch.paths.items():
            job = self.ledger.jobs.get(rid)
            if job is None or job.end is not None or not job.tokens:
                continue
            hit = nodes <= path.nodes if both else bool(nodes & path.nodes)
            if hit:
                return True
        return False

    def leader_change_during(self, start: float, end: float) -> bool:
        return any(start <= at <= end for at in self.leader_changes_at)

    def leader_changed(self, node: SimNode, old: str, new: str) -> None:
        self.trace.add("leader", node.node_id, old, new, node.cluster.term)
        self.leader_changes_at.append(trio.current_time())
        if self.t0 is None:
            return
        self.watch.leader_changes += 1
        self.coverage["leader_change"] += 1
        if any(j.end is None and j.tokens for j in self.ledger.jobs.values()):
            self.coverage["leader_change_mid_stream"] += 1
        self.maybe_stale_command(node)

    def maybe_stale_report(self, leader: SimNode, member: str, term: int) -> None:
        """A leader asks `member` for a new term: maybe a report the member sent
        before it (delayed in the network) arrives now. The leader must set it
        aside (it judges instances on reports of its current term only)."""
        p = self.plan.cluster.stale_command_p
        if not p or not self.window.active():
            return
        other = self.nodes[index_of_node(member)]
        now = () if other.crashed else other.shards.statuses()
        report = self.watch.stale_report(member, term, now)
        if report is None or not self.choices.chance(p):
            return
        self.coverage["stale_report_injected"] += 1
        if not other.crashed and report.shards != now:
            self.coverage["stale_report_differs"] += 1
        self.trace.add("stale-report", leader.node_id, member, report.term, term)
        self._root_spawn(self._deliver_late, leader, member, report)

    async def _deliver_late(self, node: SimNode, sender: str, message: ClusterMessage) -> None:
        await trio.lowlevel.checkpoint()
        if not node.crashed:
            node.inject(sender, message)

    def maybe_stale_command(self, node: SimNode) -> None:
        """A node just adopted a newer term: maybe a shard command of an older one
        (a deposed leader's, delayed in the network) reaches it now. It must be
        rejected (checked as every message is)."""
        p = self.plan.cluster.stale_command_p
        if not p or not self.window.active():
            return
        candidate = self.watch.stale_candidate(node)
        if candidate is None or not self.choices.chance(p):
            return
        sender, message = candidate
        self.watch.stale_injected += 1
        self.coverage["stale_command_injected"] += 1
        self.trace.add("stale-command", node.node_id, sender, type(message).__name__, message.term)
        node.inject(sender, message)

    # ---- BUGGIFY ----

    def buggified(self, node: SimNode, name: str, context: tuple[object, ...]) -> bool:
        """A BUGGIFY site fired in `node`: record it (it explains what follows) and
        act. Returns whether the production code takes its error path."""
        now = trio.current_time()
        self.coverage[f"buggify_{name}"] += 1
        if name == "after_send":
            peer, message = context
            kind = type(message).__name__
            self.coverage[f"buggify_after_send_{kind}"] += 1
            other = index_of_node(str(peer))
            # The link dies right after the message went into it (lost with it), or
            # just after it arrived (what followed it is lost).
            delay = self.choices.between(0.0, 2 * self.plan.settings.link_delay_max)
            self.trace.add("buggify", name, node.node_id, peer, kind, f"{delay:.4f}")
            self._root_spawn(self._cut_link, node.index, other, delay)
            return False
        (request_id,) = context
        self.trace.add("buggify", name, node.node_id, request_id)
        self.watch.buggified(str(request_id), name, now, node.index)
        return True

    async def _cut_link(self, a: int, b: int, delay: float) -> None:
        await trio.sleep(delay)
        now = trio.current_time()
        count = self.net.reset(a, b)
        self.watch.disturbed("reset", frozenset({a, b}), now, now)
        self.trace.add("reset-link", a, b, count)

    # ---- runner faults ----

    def _on_step(self, runner: FakeRunner) -> None:
        plan = self.plan.runner
        steps = self.ledger.steps
        if not self.window.active():
            return
        handle = self.runners[runner.index]
        if steps in plan.crash_steps and not handle.crashed:
            self._root_spawn(self._crash_later, handle, plan.crash_delay)
        if steps == plan.hang_step:
            self.trace.add("hang", runner.index)
            self.coverage["runner_hang"] += 1
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
        handle.death = "process"
        active = [j for j in self.ledger.jobs.values() if j.runner == handle.runner.index]
        if any(j.end is None and j.tokens for j in active):
            self.coverage["runner_crash_mid_stream"] += 1
        self.coverage["runner_crash"] += 1
        self.trace.add("crash", handle.runner.index, self.plan.runner.torn)
        now = trio.current_time()
        self.watch.disturbed("runner_crash", frozenset({handle.node.index}), now, now)
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
        "AssembledNode.run",
        "serve",
        "SimNode._run_runner",
        "FakeRunner._steps",
        "FakeRunner._watch_group",
        "Worker.run",
        "Worker._write_commands",
        "Lifespan.handle_lifespan",
        "TrioASGILifespan.__call__",
        "ShardManager.run",
        "ShardManager._supervise",
        "Cluster.run",
        "PeerLinks.run",
        "PeerLinks._dial_loop",
        "PeerLinks._handle_inbound",
        "Session.run",
        "Session._writer",
        "Session._watchdog",
        "WebSocketConnection._reader_task",
        "serve_listeners",
        "_run_handler",
        "_serve_one_listener",
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
