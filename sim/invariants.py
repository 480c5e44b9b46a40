"""The invariants, checked after each run against the fake runners' ledger.

Each violation names its kind (the shrinker keeps a reduction only if the same
kind still fails), the client, the request id and, for delivery, the sequence
number where what the client decoded first differs from what the runner emitted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sim.clients import ClientResult
from sim.dialects import DIALECTS, Error, Finish
from sim.fake_runner import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from sim.ledger import RunnerJob
from sim.watch import AFTERMATH
from sim.world import World

_TOKEN = re.compile(r"\[(\d+):(\d+)\]")

# Most telling first: a run's headline violation (and what --shrink preserves) is
# the first of these it has; a lost token explains a hung stream, not the reverse.
KINDS = (
    "delivery",
    "relay_gap",
    "orphan_events",
    "dispatched_twice",
    "wrong_request",
    "terminal",
    "horizon",
    "two_leaders",
    "stale_command",
    "spurious_teardown",
    "unexplained_error",
    "unexplained_peer_lost",
    "spurious_link_down",
    "runner_kept_going",
    "runner_work_leaked",
    "registry_leak",
    "worker_job_leak",
    "relay_leak",
    "shard_leak",
    "connection_leak",
    "not_serving",
    "leftover_tasks",
    "garbled",
    "unknown_job",
    "unexpected_exception",
    "thread",
    "unexpected_error_log",
    "no_startup",
    "no_drain",
)


@dataclass(frozen=True)
class Violation:
    kind: str
    message: str
    client: int | None = None
    request_id: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = []
        if self.client is not None:
            where.append(f"client {self.client}")
        if self.request_id is not None:
            where.append(self.request_id)
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{self.kind}: {prefix}{self.message}"


def decode_tokens(text: str) -> tuple[list[tuple[int, int]], str]:
    """The (seq, token) pairs in a client's text, and whatever else was there."""
    pairs = [(int(s), int(t)) for s, t in _TOKEN.findall(text)]
    return pairs, _TOKEN.sub("", text)


def stop_bound(world: World, relayed: bool = False, crossed: bool = False) -> tuple[float, int]:
    """How long after a client leaves (or asks to cancel) the runner may still
    step its request, and how many steps that allows: the worst-case latency of
    the HTTP link (the disconnect or the cancel request travelling to the server),
    of the link between nodes for a relayed request (RemoteCancel) and for a
    cancel sent to another node than the owner (CancelRequest), plus the runner
    pipe (the Cancel travelling to the runner), plus one step that may already be
    under way."""
    s = world.plan.scenario
    latency = 2 * s.http_delay_max + 2 * s.pipe_delay_max + 1e-6
    latency += 2 * s.link_delay_max * (relayed + crossed)
    return latency, math.ceil(latency / s.step_delay[0]) + 1


def check(
    world: World, crash: str | None, error_logs: list[str], threads: Sequence[str] = ()
) -> list[Violation]:
    out: list[Violation] = []
    if crash is not None:
        out.append(Violation("unexpected_exception", crash))
    if world.startup_failed:
        out.append(Violation("no_startup", "the cluster never served a ready instance"))
        return out
    for use in threads:
        out.append(Violation("thread", f"a thread was asked for on the simulated path: {use}"))
    for result in world.results:
        out.extend(check_client(world, result))
    out.extend(check_ledger(world))
    out.extend(check_cluster(world))
    out.extend(check_end_state(world))
    for line in error_logs:
        out.append(Violation("unexpected_error_log", line))
    rank = {kind: i for i, kind in enumerate(KINDS)}
    return sorted(out, key=lambda v: rank.get(v.kind, len(KINDS)))


def check_client(world: World, result: ClientResult) -> list[Violation]:
    plan = result.plan
    dialect = DIALECTS[plan.dialect]
    jobs = world.ledger.by_client.get(plan.index, [])
    job = jobs[0] if jobs else None
    rid = job.request_id if job is not None else result.request_id
    out: list[Violation] = []

    def bad(kind: str, message: str, seq: int | None = None) -> None:
        out.append(Violation(kind, f"({dialect.name}) {message}", plan.index, rid, seq))

    if len(jobs) > 1:
        bad("dispatched_twice", f"the runner saw {len(jobs)} commands for one request")
    if result.ending is None:
        bad(
            "horizon",
            f"stream still open at the horizon ({world.plan.scenario.horizon}s); "
            f"received {len(result.pieces)} pieces, terminals {result.terminals}",
        )
        return out
    for detail in result.bad:
        bad("garbled", detail)
    received, garbage = decode_tokens(result.text)
    # A tool call the fake runner wraps around a request's tokens: its markup,
    # rebuilt by the client from the call it got, or given back as text when
    # the call never closed (sim/fake_runner.py).
    if garbage in (TOOL_CALL_OPEN, TOOL_CALL_OPEN + TOOL_CALL_CLOSE) and "tools" in dialect.name:
        garbage = ""
    if garbage:
        bad("garbled", f"text that no runner emitted: {garbage[:80]!r}")
    if job is not None and result.request_id is not None and result.request_id != job.request_id:
        bad("wrong_request", f"client was told id {result.request_id}, runner ran {rid}")

    expected = job.tokens if job is not None else []
    terminal = result.terminals[0] if result.terminals else None
    left = result.ending == "left"
    cancelled = result.cancel_sent_at is not None
    # The node serving the client died: its connection closed mid-way, which is
    # the explicit end a client of a dead server gets.
    server_died = result.server_died and terminal is None
    cut = severed(world, rid, result) if isinstance(terminal, Error) else None
    if isinstance(terminal, Error) and not dialect.streaming:
        expected = []  # a failed non-streaming request returns no text by design
    if left or server_died or cut or (cancelled and not isinstance(terminal, Finish)):
        ok = received == expected[: len(received)]
        what = "a prefix of"
    else:
        ok = received == expected
        what = "exactly"
    if not ok:
        seq = first_difference(received, expected)
        bad(
            "delivery",
            f"client must get {what} the runner's chunks: got {len(received)} "
            f"{_show(received, seq)}, runner emitted {len(expected)} {_show(expected, seq)}; "
            f"client's terminal: {terminal}",
            seq,
        )

    if result.after_terminal:
        bad("terminal", f"received {result.after_terminal[:3]} after the terminal event")
    if terminal is None:
        if not left and not server_died:
            bad(
                "terminal",
                f"response ended ({result.ending}, status {result.status}) without a "
                f"terminal event after {len(received)} chunks",
            )
    elif isinstance(terminal, Finish):
        if job is None or job.end != "finished":
            bad(
                "terminal",
                f"client got finish ({terminal.reason}) but the runner's job "
                f"{'never ran' if job is None else 'ended ' + str(job.end)}",
            )
        elif job.finish_reason is not None and terminal.reason != job.finish_reason:
            bad("terminal", f"finish reason {terminal.reason}, runner said {job.finish_reason}")
        streamed = dialect.streaming and _has_done_marker(plan.dialect)
        if streamed and not left and not result.done_marker:
            bad("terminal", "stream finished without its end-of-stream marker")
    elif job is not None and job.end == "finished" and not cancelled and not cut:
        bad("terminal", f"client got an error ({terminal.detail}) for a finished job")
    elif job is not None and job.end == "cancelled" and not cancelled:
        bad("terminal", f"the runner cancelled a job nobody gave up: {terminal.detail}")
    refused = result.status == 429 or (
        # Ollama's dialect refuses at admission with 503 (its clients retry on it).
        isinstance(terminal, Error) and result.status == 503 and "at capacity" in terminal.detail
    )
    if isinstance(terminal, Error) and not cancelled and not refused:
        why = explain_error(world, result, rid)
        if why is None:
            bad(
                "unexplained_error",
                f"client got an error ({terminal.detail[:120]}) although no fault touched "
                "its request's nodes or the links between them",
            )
    out.extend(check_stopped(world, result, job))
    return out


def severed(world: World, rid: str | None, result: ClientResult) -> str | None:
    """Why a request may legitimately have lost chunks the runner produced before
    its explicit error: the owner gave up on the entry node (peer lost: the entry
    died, or the link stayed down past the grace), or the instance was stopped
    under it (the entry's worker is cancelled with the chunks still in its pipe)."""
    if rid is None:
        return None
    watch = world.watch
    if rid in watch.peer_lost:
        return "peer lost"
    path = watch.paths.get(rid)
    if path is not None:
        stopped = watch.instance_stops.get(path.spec.instance_id)
        if stopped is not None and (result.ended_at is None or stopped <= result.ended_at):
            return "instance stopped"
    return None


def explain_error(world: World, result: ClientResult, rid: str | None) -> str | None:
    """A fault that may explain an error a client got, or None."""
    if result.server_died:
        return "its node crashed"
    watch = world.watch
    start = result.sent_at if result.sent_at is not None else 0.0
    end = result.ended_at if result.ended_at is not None else start
    path = watch.paths.get(rid) if rid is not None else None
    # Without a path (refused before dispatch: no ready instance) any fault in the
    # cluster may be why.
    nodes = path.nodes if path is not None else frozenset(range(world.plan.scenario.nodes))
    found = watch.touching(nodes, start, end)
    return found[0].kind if found else None


def check_stopped(world: World, result: ClientResult, job: RunnerJob | None) -> list[Violation]:
    """Work a client gave up on stops within a bounded number of runner steps."""
    # A cancel the node refused (404: no node has the request; 503: the node that
    # may have it could not be asked) leaves the request running, as it says.
    left = result.ending == "left"
    accepted = result.cancel_sent_at if result.cancel_status == 200 else None
    gave_up = result.left_at if left else accepted
    if job is None or gave_up is None:
        return []
    path = world.watch.paths.get(job.request_id)
    relayed = path is not None and path.entry != path.owner
    owner = result.plan.node
    # A cancel sent to another node reaches the owner over a link (CancelRequest).
    via = None if left else result.cancel_node
    crossed = via is not None and via != owner
    latency, max_steps = stop_bound(world, relayed, crossed)
    end = gave_up + latency
    if (
        relayed
        and path is not None
        and world.watch.link_faults(path.owner, path.entry, gave_up, end)
    ) or (crossed and via is not None and world.watch.link_faults(via, owner, gave_up, end)):
        # The cancel crosses a link that was cut or held: it arrives when the link
        # is back (or the entry gives up on the owner); the end state checks that
        # the work stopped by then.
        return []
    out = []
    after = sum(1 for t in job.emit_times if t > gave_up)
    late = sum(1 for t in job.emit_times if t > gave_up + latency)
    if after > max_steps or late > 1:
        out.append(
            Violation(
                "runner_kept_going",
                f"the runner ran {after} steps for the request after its client "
                f"{'left' if left else 'cancelled'} at {gave_up:.4f}s "
                f"(bound {max_steps}; {late} more than {latency * 1000:.0f}ms later)",
                result.plan.index,
                job.request_id,
            )
        )
    return out


def check_ledger(world: World) -> list[Violation]:
    out = []
    for rid in world.ledger.duplicate_starts:
        out.append(Violation("dispatched_twice", "the runner got the same id twice", None, rid))
    for job in world.ledger.jobs.values():
        if job.client is None:
            out.append(
                Violation("unknown_job", "a runner job no client asked for", None, job.request_id)
            )
    return out


def check_cluster(world: World) -> list[Violation]:
    """Leaders, fencing, teardowns, links and the relay, from what the watch saw."""
    watch = world.watch
    out = [Violation(f.kind, f.message, None, f.request_id) for f in watch.findings]
    for rid, (owner, at) in watch.peer_lost.items():
        path = watch.paths.get(rid)
        if path is None or path.entry == owner:
            continue
        if not watch.link_faults(owner, path.entry, at - AFTERMATH, at):
            out.append(
                Violation(
                    "unexplained_peer_lost",
                    f"node n{owner} failed the request as lost to n{path.entry} at {at:.3f}s "
                    "although neither node nor the link between them had a fault",
                    None,
                    rid,
                )
            )
    for name, stats in world.relay_stats:
        if stats.gaps or stats.overflows:
            out.append(
                Violation(
                    "relay_gap",
                    f"relay of {name}: {stats.gaps} gap(s), {stats.overflows} overflow(s) "
                    "(events lost between nodes)",
                )
            )
    return out


def check_end_state(world: World) -> list[Violation]:
    state = world.end_state
    if state is None:
        return [Violation("no_drain", "the run never reached its drain")]
    out = []
    # None of these may hold a request after the drain (per node, or per runner).
    leaks = (
        (state.registry_open, "registry_leak", "node {}: still registered after the drain"),
        (state.worker_jobs, "worker_job_leak", "node {}: worker job left after the drain"),
        (state.runner_active, "runner_work_leaked", "runner {} still generating after the drain"),
        (state.relay_routes, "relay_leak", "node {}: relay route left after the drain"),
        (
            state.relay_outgoing,
            "relay_leak",
            "node {}: relay buffer (outgoing) left after the drain",
        ),
    )
    for left, kind, what in leaks:
        for place, ids in left.items():
            out.extend(Violation(kind, what.format(place), None, rid) for rid in ids)
    for node, shards in state.shards.items():
        for shard in shards:
            out.append(
                Violation(
                    "shard_leak", f"node {node}: shard {shard} is not part of a live instance"
                )
            )
    for node, count in state.connections.items():
        if count:
            out.append(
                Violation(
                    "connection_leak",
                    f"node {node}: {count} HTTP connection(s) still open after the drain",
                )
            )
    if not state.serving:
        out.append(
            Violation("not_serving", "after the drain the cluster has no ready instance everywhere")
        )
    if state.tasks:
        out.append(Violation("leftover_tasks", f"tasks alive after the drain: {state.tasks}"))
    for node, stats in state.stats.items():
        for key in ("unknown_events", "after_terminal", "overflows", "admission_in_flight"):
            if stats[key]:
                out.append(
                    Violation("orphan_events", f"node {node}: registry {key} = {stats[key]}")
                )
    return out


def first_difference(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return x[0] if i < len(a) else i
    return min(len(a), len(b))


def _show(tokens: list[tuple[int, int]], seq: int) -> str:
    seqs = [s for s, _ in tokens]
    lo = max(0, min(seq, len(seqs)) - 2)
    return f"(seqs ...{seqs[lo : lo + 5]}...)"


def _has_done_marker(name: str) -> bool:
    return name in ("openai_chat_stream", "openai_completions_stream", "anthropic_stream")
