"""What one run does: the scenario's knobs, and the plan drawn from the choice list.

The plan is drawn first, so it sits at the head of the choice list; scheduling and
per-event fault decisions follow. A drawn 0 always means the healthy, simple
option.

Swarm testing: each run first draws its `Swarm`, which kinds of trouble and which
node settings it enables at all (runner crashes or not, cluster faults or not,
short time limits of each kind, small relay buffers, keep-alive clients, ...), and
only then the workload and the faults within what is enabled. A sweep of many runs
then meets rare combinations often (two short time limits and a partition in the
same run), instead of always the same average mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from sim.choices import Choices
from sim.dialects import DIALECTS

Behavior = Literal[
    "normal",  # reads everything as fast as it comes
    "leave_before_first",  # disconnects soon after sending, before any chunk
    "leave_mid",  # disconnects after some chunks (non-streaming: after some time)
    "leave_after_last",  # disconnects right after the terminal event, before the end
    "cancel_mid",  # asks POST /v1/cancel/{id} after some chunks, reads on to the end
    "stall",  # stops reading after some chunks without closing (the send timeout cuts it)
]
BEHAVIORS: tuple[Behavior, ...] = (
    "normal",
    "leave_before_first",
    "leave_mid",
    "leave_after_last",
    "cancel_mid",
)
# Behaviours that give up before the end: they ask for more tokens, so the runner
# is still busy with them when they go.
GIVING_UP: frozenset[str] = frozenset({"leave_before_first", "leave_mid", "cancel_mid", "stall"})

# Requests a keep-alive client may send before its generation request, on the same
# connection, each answered early (before the app reads the body): an unknown route,
# a wrong method, a body over the node's limit, a missing API key.
EarlyKind = Literal["not_found", "method", "too_large", "unauthorized"]
EARLY_KINDS: tuple[EarlyKind, ...] = ("not_found", "method", "too_large", "unauthorized")
EARLY_STATUS: dict[str, int] = {
    "not_found": 404,
    "method": 405,
    "too_large": 413,
    "unauthorized": 401,
}
# Error paths production code can be made to take (seams.FaultPoints.fire).
BUGGIFY_SITES: tuple[str, ...] = ("dispatch_refused", "remote_refused", "after_send")
TIMEOUT_KINDS: tuple[str, ...] = ("ttft", "idle", "total")


@dataclass(frozen=True)
class Scenario:
    """The knobs of a sweep. The default is the issue's: 2 nodes, 8 concurrent
    requests across the dialects, about 20 tokens each."""

    name: str = "default"
    nodes: int = 2
    clients: int = 8
    tokens: tuple[int, int] = (16, 24)
    # Clients that mean to leave early ask for more, as a user closing a tab would.
    leaving_tokens: tuple[int, int] = (32, 64)
    fault_window: float = 0.4
    horizon: float = 30.0
    # Longer than hypercorn's keep_alive_timeout (5 s, production's default): a
    # connection that closes without sending a request is held that long.
    drain: float = 6.0
    step_delay: tuple[float, float] = (0.002, 0.02)
    http_delay_max: float = 0.01
    pipe_delay_max: float = 0.005
    point_delay_max: float = 0.05
    read_pause_max: float = 0.05
    restart_backoff: float = 0.05
    keepalive: float = 1.0
    max_crashes: int = 2
    context_length: int = 4096
    # Between nodes: per-write delays on the links, and the cluster faults.
    link_delay_max: float = 0.005
    slow_link_delay: float = 0.05
    max_cluster_faults: int = 3
    # A partition or an outage is short (a reconnect within the relay's grace
    # loses nothing) or long (past the grace and the heartbeat timeout).
    short_outage: tuple[float, float] = (0.05, 1.0)
    long_outage: tuple[float, float] = (2.5, 4.0)
    # How long a broken distributed group takes to notice (its collective fails).
    group_detect_max: float = 0.05
    # Swarm knobs: the ranges of the settings a run may draw.
    long_tokens: tuple[int, int] = (200, 1000)
    short_ttft: tuple[float, float] = (0.03, 0.5)
    short_idle: tuple[float, float] = (0.02, 0.2)
    short_total: tuple[float, float] = (0.2, 2.0)
    # Above what a slow reader's pauses and the HTTP delays can block a write for.
    short_send_timeout: tuple[float, float] = (0.1, 0.3)
    http_keepalive_timeout: float = 1.0  # hypercorn's keep_alive_timeout (production: 5)
    max_body_bytes: int = 16384  # a "too_large" early request sends more
    # Focus knobs (None / True: drawn from the list as usual).
    leader_serves: bool | None = None  # does node 0, the first leader, serve the model
    single_server: bool = False  # exactly one node serves: every other relays to it
    runner_crashes: bool = True
    leader_faults: bool = False  # every cluster fault hits node 0
    fault_kinds: tuple[str, ...] = ("reset", "partition", "crash")
    long_outage_p: float = 0.4
    # The fake runners model the engine's starts: a prompt cache of this many
    # tokens and a prefill costing this much virtual time per uncached prompt
    # token (0, 0: off, every scenario recorded before the cache keeps its timing).
    prompt_cache_tokens: int = 0
    prefill_seconds_per_token: float = 0.0
    # Swarm features every run of this scenario has (its focus), not drawn.
    always: tuple[str, ...] = ()
    # How often a client is a slow reader, in a run that has them.
    slow_reader_p: float = 0.5
    buggify_sites: tuple[str, ...] = BUGGIFY_SITES
    buggify_ps: tuple[float, ...] = (0.05, 0.2, 0.5)  # how often an enabled site fires


DEFAULT = Scenario()

SCENARIOS: dict[str, Scenario] = {
    "default": DEFAULT,
    # The leader holds no shard and is lost (crashed, cut off): the instance on
    # the other nodes must keep streaming through the leader change.
    "leader-change": Scenario(
        name="leader-change",
        nodes=3,
        leader_serves=False,
        runner_crashes=False,
        leader_faults=True,
        always=("cluster_faults", "stale_messages"),
    ),
    # The links between nodes are cut, held and reset while requests stream
    # across them: the relay must lose nothing it can re-send.
    "link-faults": Scenario(
        name="link-faults",
        runner_crashes=False,
        single_server=True,
        fault_kinds=("reset", "partition"),
        max_cluster_faults=4,
        always=("cluster_faults",),
    ),
    # Every request waits under short time limits, with slow and stalling readers
    # beside it: the limits must fire exactly when due, and stop the runner's work.
    "timeouts": Scenario(
        name="timeouts",
        always=("timeouts", "slow_readers", "leaving_clients"),
        slow_reader_p=0.8,
    ),
    # Every request is relayed, acknowledged every few events, through small
    # buffers and slow links that a fault may cut right after a message, beside
    # link and node faults.
    "relay": Scenario(
        name="relay",
        single_server=True,
        runner_crashes=False,
        buggify_sites=("after_send",),
        always=(
            "small_sockets",
            "slow_links",
            "long_requests",
            "small_acks",
            "small_buffers",
            "buggify",
            "cluster_faults",
        ),
    ),
    # Clients that leave, cancel, stall and keep their connections alive.
    "clients": Scenario(
        name="clients",
        always=("leaving_clients", "keepalive_clients", "api_key", "tight_admission"),
    ),
    # Node 0 crashes and comes back quickly (within the relay's grace, often
    # before its links time out): nothing may wait for its previous life.
    "node-restart": Scenario(
        name="node-restart",
        runner_crashes=False,
        leader_faults=True,
        fault_kinds=("crash",),
        long_outage_p=0.0,
        always=("cluster_faults",),
    ),
    # The runners keep a prompt cache and prefill what starts in a step together
    # (the simulated prompts share their first ~30 tokens, so hits are common and
    # shorten the start): delivery stays exactly once with the engine's start
    # timing, under the usual faults.
    "prompt-cache": Scenario(
        name="prompt-cache",
        prompt_cache_tokens=2048,
        prefill_seconds_per_token=0.0005,
    ),
}


def scenario_for(nodes: int | None = None, base: Scenario | str = DEFAULT) -> Scenario:
    """A named (or given) scenario, with `nodes` nodes if given (1 runs the
    cluster code on a lone node)."""
    if isinstance(base, str):
        if base not in SCENARIOS:
            raise ValueError(f"unknown scenario {base!r} (known: {sorted(SCENARIOS)})")
        base = SCENARIOS[base]
    if nodes is None or nodes == base.nodes:
        return base
    if nodes < 1:
        raise ValueError("a scenario needs at least one node")
    return replace(base, nodes=nodes)


@dataclass(frozen=True)
class EarlyRequest:
    """A request answered before its body is read, sent ahead of the generation
    request on a keep-alive connection."""

    kind: EarlyKind
    late_body: bool  # the body goes out only once the response has arrived
    pipelined: bool  # the next request is written at once, before this response


@dataclass(frozen=True)
class ClientPlan:
    index: int
    dialect: str
    node: int
    start: float
    max_tokens: int
    behavior: Behavior
    leave_after_pieces: int
    leave_after_time: float
    read_pause_max: float
    recv_capacity: int
    # Keep-alive: the connection is kept for several requests (early ones first),
    # and, with `idle_after`, left open after the last one until the node closes it.
    keepalive: bool = False
    early: tuple[EarlyRequest, ...] = ()
    idle_after: bool = False


@dataclass(frozen=True)
class RunnerPlan:
    # Runner steps (counted across restarts) after which the current runner dies.
    crash_steps: tuple[int, ...]
    crash_delay: float
    torn: bool
    hang_step: int | None
    hang_for: float


@dataclass(frozen=True)
class FaultPlan:
    window: float
    point_delay_p: float
    point_yield_p: float
    http_delay_p: float
    http_split_p: float
    pipe_delay_p: float
    pipe_split_p: float


ClusterFaultKind = Literal["reset", "partition", "crash"]


@dataclass(frozen=True)
class ClusterFault:
    """One fault between or on nodes, `at` seconds into the fault window.

    reset: every connection between nodes a and b gets an RST (they reconnect at
    once). partition: a and b cannot reach each other for `duration` (mode
    "reset": connections cut and refused; "hold": bytes held, as TCP rides out a
    partition). crash: node a dies (mode "process": its sockets close; "machine":
    it goes silent) and restarts after `duration` (math.inf: never)."""

    kind: ClusterFaultKind
    at: float
    a: int
    b: int = -1
    mode: str = ""
    duration: float = 0.0


@dataclass(frozen=True)
class ClusterPlan:
    serve: tuple[bool, ...]  # which nodes were started to serve the model
    link_delay_p: float
    link_split_p: float
    faults: tuple[ClusterFault, ...]
    # After a node adopts a newer term: the chance that a shard command of an
    # older term (a deposed leader's, delayed in the network) reaches it then.
    stale_command_p: float


@dataclass(frozen=True)
class Swarm:
    """What this run enables at all (each off when its draw is 0)."""

    runner_crashes: bool = False
    runner_hangs: bool = False
    point_faults: bool = False  # delays and reschedules at the production fault points
    stream_faults: bool = False  # delays and split writes on connections, pipes, links
    cluster_faults: bool = False  # resets, partitions, node crashes
    stale_messages: bool = False  # a deposed leader's commands, reports from old terms
    buggify: tuple[str, ...] = ()  # error paths forced (BUGGIFY_SITES)
    leaving_clients: bool = False  # clients that leave, cancel or stall
    slow_readers: bool = False
    keepalive_clients: bool = False
    long_requests: bool = False
    short_timeouts: tuple[str, ...] = ()  # TIMEOUT_KINDS made short
    small_acks: bool = False  # the relay acknowledges every 1 to 4 events
    small_buffers: bool = False  # small relay buffers (the owner's acks cannot keep up)
    small_sockets: bool = False  # small socket buffers between nodes (writes block)
    slow_links: bool = False  # writes between nodes delayed up to 50 ms (the outbox backs up)
    small_batch: bool = False  # a runner batch of 2 (the queue backs up)
    tight_admission: bool = False  # few requests may wait: 429s
    api_key: bool = False  # the nodes require one (clients send it)


@dataclass(frozen=True)
class NodeSettings:
    """The nodes' settings for this run (the daemon's flags)."""

    keepalive: float  # the API's keep-alive interval (short ones exercise its timeouts)
    max_batch: int  # the fake runner's batch: requests beyond it wait for a slot
    max_queued: int  # admission: requests beyond max_batch + this are refused (429)
    ttft_timeout: float = 0.0  # 0: production's default (which never fires here)
    idle_timeout: float = 0.0
    request_timeout: float = 0.0
    send_timeout: float = 0.0  # 0: production's default
    ack_every: int = 32  # token_relay.ACK_EVERY
    relay_buffer: int = 4096  # token_relay.BUFFER_LIMIT
    link_capacity: int = 65536  # bytes a link's socket buffers hold each way
    link_delay_max: float = 0.005  # the longest delay of a write between nodes
    api_key: str | None = None


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    swarm: Swarm
    settings: NodeSettings
    clients: tuple[ClientPlan, ...]
    runner: RunnerPlan
    faults: FaultPlan
    cluster: ClusterPlan
    buggify_p: float  # how often an enabled BUGGIFY site fires (in the fault window)

    # The settings the rest of the simulator read directly.
    @property
    def keepalive(self) -> float:
        return self.settings.keepalive

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch

    @property
    def max_queued(self) -> int:
        return self.settings.max_queued


def client_behaviors(streaming: bool, can_cancel: bool, stall: bool) -> tuple[Behavior, ...]:
    """What a client of a dialect can do: only a streaming client sees chunks (to
    leave after some, or after the last, or stop reading) and learns its id in time
    to cancel."""
    if not streaming:
        return ("normal", "leave_before_first", "leave_mid")
    behaviors = [b for b in BEHAVIORS if b != "cancel_mid" or can_cancel]
    if can_cancel:
        behaviors.append("cancel_mid")  # cancelling twice as likely: it has the most paths
    if stall:
        behaviors.append("stall")
    return tuple(behaviors)


def draw_swarm(choices: Choices, s: Scenario) -> Swarm:
    """Each feature on or off for this run, with the chance its line gives (the
    scenario may rule one out, or always have it). The chances keep enough quiet
    runs: a run that only ever fails its requests checks nothing about finishing
    them."""

    def on(p: float, allowed: bool = True, name: str = "") -> bool:
        if name in s.always:
            return allowed
        return allowed and choices.chance(p)

    cluster = s.nodes > 1
    timeouts = on(0.3, True, "timeouts")
    return Swarm(
        runner_crashes=on(0.4, s.runner_crashes, "runner_crashes"),
        runner_hangs=on(0.3, True, "runner_hangs"),
        point_faults=on(0.5, True, "point_faults"),
        stream_faults=on(0.5, True, "stream_faults"),
        cluster_faults=on(0.5, cluster and s.max_cluster_faults > 0, "cluster_faults"),
        stale_messages=on(0.5, cluster, "stale_messages"),
        buggify=tuple(
            site for site in s.buggify_sites if on(0.3, cluster or site != "after_send", "buggify")
        ),
        leaving_clients=on(0.5, True, "leaving_clients"),
        slow_readers=on(0.4, True, "slow_readers"),
        keepalive_clients=on(0.5, True, "keepalive_clients"),
        long_requests=on(0.3, True, "long_requests"),
        short_timeouts=tuple(kind for kind in TIMEOUT_KINDS if on(0.5, timeouts)),
        small_acks=on(0.5, cluster, "small_acks"),
        small_buffers=on(0.4, True, "small_buffers"),
        small_sockets=on(0.4, cluster, "small_sockets"),
        slow_links=on(0.3, cluster, "slow_links"),
        small_batch=on(0.3, True, "small_batch"),
        tight_admission=on(0.3, True, "tight_admission"),
        api_key=on(0.5, True, "api_key"),
    )


def draw_settings(choices: Choices, s: Scenario, swarm: Swarm) -> NodeSettings:
    timeouts = {
        kind: choices.between(*span) if kind in swarm.short_timeouts else 0.0
        for kind, span in (("ttft", s.short_ttft), ("idle", s.short_idle), ("total", s.short_total))
    }
    return NodeSettings(
        keepalive=choices.pick((s.keepalive, 0.05)),
        max_batch=choices.pick((2, 1)) if swarm.small_batch else choices.pick((8, 4, 32)),
        max_queued=choices.pick((2, 0)) if swarm.tight_admission else 64,
        ttft_timeout=timeouts["ttft"],
        idle_timeout=timeouts["idle"],
        request_timeout=timeouts["total"],
        send_timeout=choices.between(*s.short_send_timeout) if swarm.leaving_clients else 0.0,
        ack_every=choices.int_between(1, 4) if swarm.small_acks else 32,
        relay_buffer=choices.int_between(4, 32) if swarm.small_buffers else 4096,
        link_capacity=choices.pick((2048, 512)) if swarm.small_sockets else 65536,
        link_delay_max=s.slow_link_delay if swarm.slow_links else s.link_delay_max,
        api_key="sim-key" if swarm.api_key else None,
    )


def draw_plan(choices: Choices, scenario: Scenario, dialects: list[str], can_cancel: bool) -> Plan:
    s = scenario
    swarm = draw_swarm(choices, s)
    settings = draw_settings(choices, s, swarm)
    point = swarm.point_faults
    stream = swarm.stream_faults
    faults = FaultPlan(
        window=s.fault_window,
        point_delay_p=choices.pick((0.2, 0.5, 0.9)) if point else 0.0,
        point_yield_p=choices.pick((0.0, 0.5)) if point else 0.0,
        http_delay_p=choices.pick((0.0, 0.3, 0.8)) if stream else 0.0,
        http_split_p=choices.pick((0.0, 0.2, 0.5)) if stream else 0.0,
        pipe_delay_p=choices.pick((0.0, 0.3, 0.8)) if stream else 0.0,
        pipe_split_p=choices.pick((0.0, 0.2, 0.5)) if stream else 0.0,
    )
    crashes = choices.int_between(1, s.max_crashes) if swarm.runner_crashes else 0
    hang = swarm.runner_hangs
    runner = RunnerPlan(
        crash_steps=tuple(sorted(choices.int_between(1, 30) for _ in range(crashes))),
        crash_delay=choices.between(0.0, 0.01),
        torn=choices.chance(0.3),
        hang_step=choices.int_between(1, 20) if hang else None,
        hang_for=choices.between(0.0, 0.2),
    )
    # With long requests enabled, one client asks for hundreds to a couple of
    # thousand tokens (the relay's acks and buffers, the idle limit over a long run).
    long_client = choices.draw(s.clients) if swarm.long_requests else -1
    clients = []
    for i in range(s.clients):
        dialect = choices.pick(dialects)
        streaming = DIALECTS[dialect].streaming
        behavior: Behavior = "normal"
        if swarm.leaving_clients and choices.chance(0.6):
            behaviors = client_behaviors(streaming, can_cancel, settings.send_timeout > 0)
            behavior = behaviors[choices.draw(len(behaviors))]
        # A slow reader pauses before every read, and with a small receive buffer it
        # pushes back on the server. (Not the long request: it must end in time.)
        slow = swarm.slow_readers and i != long_client and choices.chance(s.slow_reader_p)
        low, high = s.leaving_tokens if behavior in GIVING_UP else s.tokens
        max_tokens = choices.int_between(low, high)
        if i == long_client:
            max_tokens = choices.int_between(*s.long_tokens)
        keepalive = swarm.keepalive_clients and choices.chance(0.5)
        early: list[EarlyRequest] = []
        if keepalive:
            for _ in range(choices.draw(3)):
                kind = choices.pick(EARLY_KINDS)
                if kind == "unauthorized" and settings.api_key is None:
                    kind = "not_found"
                early.append(EarlyRequest(kind, choices.chance(0.5), choices.chance(0.3)))
        clients.append(
            ClientPlan(
                index=i,
                dialect=dialect,
                node=choices.draw(s.nodes),
                start=choices.between(0.0, s.fault_window * 0.75),
                max_tokens=max_tokens,
                behavior=behavior,
                leave_after_pieces=choices.int_between(1, 12),
                leave_after_time=choices.between(0.0, 0.15),
                read_pause_max=s.read_pause_max if slow else 0.0,
                recv_capacity=choices.pick((1 << 16, 256, 1024, 4096))
                if i != long_client
                else 1 << 16,
                keepalive=keepalive,
                early=tuple(early),
                idle_after=keepalive and choices.chance(0.5),
            )
        )
    return Plan(
        scenario=s,
        swarm=swarm,
        settings=settings,
        clients=tuple(clients),
        runner=runner,
        faults=faults,
        cluster=draw_cluster_plan(choices, s, swarm),
        buggify_p=choices.pick(s.buggify_ps) if swarm.buggify else 0.0,
    )


def draw_cluster_plan(choices: Choices, s: Scenario, swarm: Swarm) -> ClusterPlan:
    n = s.nodes
    if n < 2:
        return ClusterPlan((True,), 0.0, 0.0, (), 0.0)
    # Usually every node serves (one instance across all of them); otherwise one
    # node does not, so the leader (node 0) may hold no shard: its change must
    # then leave the instance streaming.
    serve = [True] * n
    if s.single_server:
        serve = [False] * n
        serve[choices.draw(n)] = True
    elif s.leader_serves is False:
        serve[0] = False
    elif choices.chance(0.4):
        # Half the time it is node 0, the first leader: a leader change must then
        # leave the instance on the others streaming.
        serve[choices.pick((0, *range(n)))] = False
    link_delay_p = choices.pick((0.0, 0.3, 0.8)) if swarm.stream_faults else 0.0
    if swarm.slow_links:
        link_delay_p = 0.8
    link_split_p = choices.pick((0.0, 0.2, 0.5)) if swarm.stream_faults else 0.0
    faults = []
    count = choices.int_between(1, s.max_cluster_faults) if swarm.cluster_faults else 0
    for _ in range(count):
        kind = choices.pick(s.fault_kinds)
        at = choices.between(0.0, s.fault_window)
        # Half the time the fault hits node 0, the first leader: a leader change.
        a = 0 if s.leader_faults else choices.pick((0, *range(n)))
        b = (a + 1 + choices.draw(n - 1)) % n
        low, high = s.long_outage if choices.chance(s.long_outage_p) else s.short_outage
        duration = choices.between(low, high)
        if kind == "reset":
            faults.append(ClusterFault("reset", at, a, b))
        elif kind == "partition":
            mode = choices.pick(("reset", "hold"))
            faults.append(ClusterFault("partition", at, a, b, mode, duration))
        else:
            mode = choices.pick(("process", "machine"))
            if choices.chance(s.long_outage_p / 2):  # 0.2 by default: never back
                duration = math.inf
            faults.append(ClusterFault("crash", at, a, -1, mode, duration))
    faults.sort(key=lambda f: f.at)
    return ClusterPlan(
        serve=tuple(serve),
        link_delay_p=link_delay_p,
        link_split_p=link_split_p,
        faults=tuple(faults),
        stale_command_p=choices.pick((0.5, 1.0)) if swarm.stale_messages else 0.0,
    )
