"""What one run does: the scenario's knobs, and the plan drawn from the choice list.

The plan (workload, fault rates, runner crashes and hangs, which nodes serve the
model, the cluster faults) is drawn first, so it sits at the head of the choice
list; scheduling and per-event fault decisions follow. A drawn 0 always means the
healthy, simple option.
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
GIVING_UP: frozenset[str] = frozenset({"leave_before_first", "leave_mid", "cancel_mid"})


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
    max_cluster_faults: int = 3
    # A partition or an outage is short (a reconnect within the relay's grace
    # loses nothing) or long (past the grace and the heartbeat timeout).
    short_outage: tuple[float, float] = (0.05, 1.0)
    long_outage: tuple[float, float] = (2.5, 4.0)
    # How long a broken distributed group takes to notice (its collective fails).
    group_detect_max: float = 0.05
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
    ),
    # The links between nodes are cut, held and reset while requests stream
    # across them: the relay must lose nothing it can re-send.
    "link-faults": Scenario(
        name="link-faults",
        runner_crashes=False,
        single_server=True,
        fault_kinds=("reset", "partition"),
        max_cluster_faults=4,
    ),
    # Node 0 crashes and comes back quickly (within the relay's grace, often
    # before its links time out): nothing may wait for its previous life.
    "node-restart": Scenario(
        name="node-restart",
        runner_crashes=False,
        leader_faults=True,
        fault_kinds=("crash",),
        long_outage_p=0.0,
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
class Plan:
    scenario: Scenario
    clients: tuple[ClientPlan, ...]
    runner: RunnerPlan
    faults: FaultPlan
    cluster: ClusterPlan
    keepalive: float  # the API's keep-alive interval (short ones exercise its timeouts)
    max_batch: int  # the fake runner's batch: requests beyond it wait for a slot
    max_queued: int  # admission: requests beyond max_batch + this are refused (429)


def client_behaviors(streaming: bool, can_cancel: bool) -> tuple[Behavior, ...]:
    """What a client of a dialect can do: only a streaming client sees chunks (to
    leave after some, or after the last) and learns its id in time to cancel."""
    if not streaming:
        return ("normal", "leave_before_first", "leave_mid")
    if not can_cancel:
        return tuple(b for b in BEHAVIORS if b != "cancel_mid")
    return (*BEHAVIORS, "cancel_mid")  # cancelling twice as likely: it has the most paths


def draw_plan(choices: Choices, scenario: Scenario, dialects: list[str], can_cancel: bool) -> Plan:
    s = scenario
    faults = FaultPlan(
        window=s.fault_window,
        point_delay_p=choices.pick((0.0, 0.2, 0.5, 0.9)),
        point_yield_p=choices.pick((0.0, 0.5)),
        http_delay_p=choices.pick((0.0, 0.3, 0.8)),
        http_split_p=choices.pick((0.0, 0.2, 0.5)),
        pipe_delay_p=choices.pick((0.0, 0.3, 0.8)),
        pipe_split_p=choices.pick((0.0, 0.2, 0.5)),
    )
    # No runner crash in half the runs: a crash breaks a sharded instance, and the
    # cluster faults need live instances to act on.
    crashes = choices.pick((0, *range(s.max_crashes + 1))) if s.runner_crashes else 0
    hang = choices.chance(0.3)
    runner = RunnerPlan(
        crash_steps=tuple(sorted(choices.int_between(1, 30) for _ in range(crashes))),
        crash_delay=choices.between(0.0, 0.01),
        torn=choices.chance(0.3),
        hang_step=choices.int_between(1, 20) if hang else None,
        hang_for=choices.between(0.0, 0.2),
    )
    clients = []
    for i in range(s.clients):
        dialect = choices.pick(dialects)
        behaviors = client_behaviors(DIALECTS[dialect].streaming, can_cancel)
        behavior = behaviors[choices.draw(len(behaviors))] if choices.chance(0.6) else "normal"
        # Any client may also be a slow reader: it pauses before every read, and
        # with a small receive buffer it pushes back on the server.
        slow = choices.chance(0.4)
        low, high = s.leaving_tokens if behavior in GIVING_UP else s.tokens
        clients.append(
            ClientPlan(
                index=i,
                dialect=dialect,
                node=choices.draw(s.nodes),
                start=choices.between(0.0, s.fault_window * 0.75),
                max_tokens=choices.int_between(low, high),
                behavior=behavior,
                leave_after_pieces=choices.int_between(1, 12),
                leave_after_time=choices.between(0.0, 0.15),
                read_pause_max=s.read_pause_max if slow else 0.0,
                recv_capacity=choices.pick((1 << 16, 256, 1024, 4096)),
            )
        )
    return Plan(
        scenario=s,
        clients=tuple(clients),
        runner=runner,
        faults=faults,
        cluster=draw_cluster_plan(choices, s),
        keepalive=choices.pick((s.keepalive, 0.05)),
        max_batch=choices.pick((8, 4)),
        max_queued=choices.pick((64, 2)),
    )


def draw_cluster_plan(choices: Choices, s: Scenario) -> ClusterPlan:
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
    link_delay_p = choices.pick((0.0, 0.3, 0.8))
    link_split_p = choices.pick((0.0, 0.2, 0.5))
    faults = []
    for _ in range(choices.draw(s.max_cluster_faults + 1)):
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
        stale_command_p=choices.pick((0.0, 0.5, 1.0)),
    )
