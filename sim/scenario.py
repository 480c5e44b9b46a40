"""What one run does: the scenario's knobs, and the plan drawn from the choice list.

The plan (workload, fault rates, runner crashes and hangs) is drawn first, so it
sits at the head of the choice list; scheduling and per-event fault decisions
follow. A drawn 0 always means the healthy, simple option.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """The knobs of a sweep. The default is the issue's: 8 concurrent requests
    across the dialects, about 20 tokens each."""

    name: str = "default"
    nodes: int = 1
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


DEFAULT = Scenario()


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


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    clients: tuple[ClientPlan, ...]
    runner: RunnerPlan
    faults: FaultPlan
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
    crashes = choices.draw(s.max_crashes + 1)
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
        keepalive=choices.pick((s.keepalive, 0.05)),
        max_batch=choices.pick((8, 4)),
        max_queued=choices.pick((64, 2)),
    )
