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

from exo_trio.token_relay import BUFFER_LIMIT as DEFAULT_RELAY_BUFFER
from sim.clients import ClientResult
from sim.dialects import DIALECTS, Error, Finish
from sim.fake_runner import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from sim.ledger import RunnerJob
from sim.scenario import EARLY_STATUS
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
    "spurious_timeout",
    "spurious_send_timeout",
    "early_answer",
    "keepalive_not_closed",
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


def stop_bound(
    world: World,
    relayed: bool = False,
    crossed: bool = False,
    over_http: bool = True,
    queued: float = 0.0,
) -> tuple[float, int]:
    """How long after a client leaves (or asks to cancel) the runner may still
    step its request, and how many steps that allows: the worst-case latency of
    the HTTP link (the disconnect or the cancel request travelling to the server),
    of the link between nodes for a relayed request (RemoteCancel) and for a
    cancel sent to another node than the owner (CancelRequest), plus the runner
    pipe (the Cancel travelling to the runner), plus one step that may already be
    under way; plus `queued`, the time a RemoteCancel waited behind other messages
    on a backed-up link (small socket buffers, slow writes: delivered late, in
    order, not lost)."""
    s = world.plan.scenario
    latency = 2 * s.http_delay_max * over_http + 2 * s.pipe_delay_max + 1e-6
    latency += 2 * world.plan.settings.link_delay_max * (relayed + crossed) + queued
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

    out.extend(check_early(world, result, rid))
    if len(jobs) > 1:
        bad("dispatched_twice", f"the runner saw {len(jobs)} commands for one request")
    if result.ending is None:
        bad(
            "horizon",
            f"stream still open at the horizon ({world.plan.scenario.horizon}s); "
            f"received {len(result.pieces)} pieces, terminals {result.terminals}"
            + connection_story(result),
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
    # The node serving the client died, or cut a reader that stalled: its connection
    # closed mid-way, which is the explicit end such a client gets.
    server_died = result.server_died and terminal is None
    cut_off = result.stalled_at is not None and terminal is None
    failure = failure_of(world, result, rid) if isinstance(terminal, Error) else None
    timed_out = failure is not None and failure.kind == "timeout"
    cut = severed(world, rid, result) if isinstance(terminal, Error) else None
    if failure is not None and failure.explained == "a small relay buffer":
        cut = "the relay's buffer filled"  # the entry ended it and cancelled its work
    if isinstance(terminal, Error) and not dialect.streaming:
        expected = []  # a failed non-streaming request returns no text by design
    early_end = cancelled and not isinstance(terminal, Finish)
    if left or server_died or cut_off or cut or timed_out or early_end:
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
        if not left and not server_died and not cut_off:
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
    elif job is not None and job.end == "finished" and not (cancelled or cut or timed_out):
        bad("terminal", f"client got an error ({terminal.detail}) for a finished job")
    elif job is not None and job.end == "cancelled" and not (cancelled or cut or timed_out):
        bad("terminal", f"the runner cancelled a job nobody gave up: {terminal.detail}")
    if isinstance(terminal, Error) and not cancelled:
        assert failure is not None
        world.error_kinds[failure.kind] += 1
        if failure.explained is None:
            bad(
                "unexplained_error",
                f"client got an error ({terminal.detail[:120]}; {failure.kind}) that no fault "
                f"on its request's path explains: {failure.why}",
            )
        else:
            world.explained[f"{failure.kind} by {failure.explained}"] += 1
    out.extend(check_timeout(world, result, job, rid))
    out.extend(check_stopped(world, result, job))
    return out


def connection_story(result: ClientResult) -> str:
    """What a keep-alive client's connection went through before it hung."""
    if not result.early:
        return ""
    steps = []
    for early in result.early:
        how = "reused" if early.reused else "closed" if early.closed else "told to close"
        extra = ", body after the answer" if early.late_body else ""
        extra += ", pipelined" if early.pipelined else ""
        steps.append(f"{early.kind} -> {early.status} ({how}{extra})")
    return "; its connection before it: " + "; ".join(steps)


def check_early(world: World, result: ClientResult, rid: str | None) -> list[Violation]:
    """Early answers have their status, and an idle kept-alive connection is closed
    after the node's keep-alive timeout."""
    out = []
    plan = result.plan
    for early in result.early:
        want = EARLY_STATUS[early.kind]
        if early.status != want and not result.server_died:
            out.append(
                Violation(
                    "early_answer",
                    f"a {early.kind} request got {early.status}, not {want}"
                    + connection_story(result),
                    plan.index,
                    rid,
                )
            )
    cut = [c for c, who in world.connection_client.items() if who == plan.index]
    if result.stalled_at is None and any(c in world.watch.send_timeouts for c in cut):
        out.append(
            Violation(
                "spurious_send_timeout",
                "the node cut the connection of a client that kept reading (send timeout "
                f"{world.plan.settings.send_timeout:g}s)",
                plan.index,
                rid,
            )
        )
    if result.idle_from is not None and result.idle_closed_at is None:
        crashed = result.server_died
        if not crashed:
            out.append(
                Violation(
                    "keepalive_not_closed",
                    f"an idle keep-alive connection stayed open more than "
                    f"{world.plan.scenario.http_keepalive_timeout:g}s (the node's keep-alive "
                    f"timeout) after its last response" + connection_story(result),
                    plan.index,
                    rid,
                )
            )
    return out


@dataclass(frozen=True)
class Failure:
    """Why a request ended in an error, as far as the node says (its kind), and
    the fault that explains it (None: nothing does; `why` then says what was looked
    for)."""

    kind: str
    explained: str | None
    why: str = ""


def failure_of(world: World, result: ClientResult, rid: str | None) -> Failure:
    """The error a client got, and what explains it. Each kind of error has the
    faults that can cause it, each within the window its own mechanism bounds."""
    watch = world.watch
    status = result.status
    if rid is not None and rid in watch.timeouts:
        return Failure("timeout", "its time limit")  # checked in check_timeout
    if status == 429 or (status == 503 and result.terminals and _capacity(result)):
        return explain_refusal(world, result)
    failure = watch.failures.get(rid) if rid is not None else None
    if failure is None and result.server_died:
        return Failure("server_died", "its node crashed")
    if failure is None:
        # Refused before dispatch (503: no ready instance).
        return explain_unavailable(world, result, None, "runner_unavailable")
    kind, _node, at, message = failure
    if kind == "runner_died":
        return explain_runner_died(world, result, rid, at)
    if kind == "peer_lost":
        return explain_peer_lost(world, result, rid, at, message)
    if kind == "runner_unavailable":
        return explain_unavailable(world, result, rid, kind)
    return Failure(kind, None, f"no fault causes {kind} errors")


def _capacity(result: ClientResult) -> bool:
    terminal = result.terminals[0]
    return isinstance(terminal, Error) and "at capacity" in terminal.detail


def _path_nodes(world: World, rid: str | None) -> frozenset[int]:
    path = world.watch.paths.get(rid) if rid is not None else None
    if path is None:
        return frozenset(range(world.plan.scenario.nodes))
    return path.nodes


def explain_refusal(world: World, result: ClientResult) -> Failure:
    """At capacity: refused only while the node really held its limit of exchanges
    (counted from the clients' side: sent, and not yet ended)."""
    node = result.plan.node
    start = result.sent_at if result.sent_at is not None else 0.0
    end = result.ended_at if result.ended_at is not None else start
    slack = 2 * world.plan.scenario.http_delay_max + 0.01
    for index, at, held, limit in world.watch.refusals:
        if index != node or not start - slack <= at <= end + slack:
            continue
        open_ = sum(
            1
            for other in world.results
            if other is not result
            and other.plan.node == node
            and other.sent_at is not None
            and other.sent_at <= at
            and (other.ended_at is None or other.ended_at + slack >= at)
        )
        if open_ >= limit:
            return Failure("refused", "the node at capacity")
        return Failure(
            "refused",
            None,
            f"refused at {at:.3f}s holding {held} of {limit}, but only {open_} other "
            "exchange(s) were open there",
        )
    return Failure("refused", None, "no refusal was recorded at its node")


def explain_runner_died(world: World, result: ClientResult, rid: str | None, at: float) -> Failure:
    """The runner holding it died (a crash, or its distributed group broke): the
    ledger says so; or it died before the request reached it (a runner crash on an
    instance node then)."""
    job = world.ledger.jobs.get(rid) if rid is not None else None
    if job is not None and job.end in ("lost", "died") and (job.end_at or 0.0) <= at:
        return Failure("runner_died", "its runner died" if job.end == "lost" else "its group broke")
    nodes = _path_nodes(world, rid)
    for d in world.watch.touching(nodes, at - AFTERMATH, at):
        if d.kind in ("runner_crash", "crash", "partition", "reset", "group_break"):
            return Failure("runner_died", f"{d.kind} on its instance")
    return Failure("runner_died", None, "its runner lived, and no runner or node on its path died")


def explain_peer_lost(
    world: World, result: ClientResult, rid: str | None, at: float, message: str
) -> Failure:
    """Lost to its entry node: the link between owner and entry was cut or held,
    or the entry crashed (within the grace, the heartbeat timeout and a tick after
    the fault), or the link died with the request's messages in it (BUGGIFY), or the
    owner stopped acknowledging a relay with a small buffer."""
    watch = world.watch
    if "stopped acknowledging" in message:
        if world.plan.settings.relay_buffer < DEFAULT_RELAY_BUFFER:
            return Failure("peer_lost", "a small relay buffer")
        return Failure("peer_lost", None, "a relay buffer of the default size overflowed")
    path = watch.paths.get(rid) if rid is not None else None
    if path is None:
        return Failure("peer_lost", None, "it was never dispatched")
    faults = watch.link_faults(path.owner, path.entry, at - AFTERMATH, at)
    if faults:
        return Failure("peer_lost", f"{faults[0].kind} between owner and entry")
    return Failure("peer_lost", None, f"no fault on n{path.owner} - n{path.entry}")


def explain_unavailable(world: World, result: ClientResult, rid: str | None, kind: str) -> Failure:
    """No ready instance could take it: a BUGGIFY site refused it, or a fault on
    its path (or, refused before dispatch, anywhere) made its instance unavailable."""
    if rid is not None and rid in world.watch.buggify:
        return Failure(kind, f"BUGGIFY {world.watch.buggify[rid][0][0]}")
    start = result.sent_at if result.sent_at is not None else 0.0
    end = result.ended_at if result.ended_at is not None else start
    if rid is None:
        # A non-streaming error carries no request id: a refusal of a request of
        # this client's node while it waited.
        for fired in world.watch.buggify.values():
            for site, at, owner in fired:
                if owner == result.plan.node and start <= at <= end:
                    return Failure(kind, f"BUGGIFY {site}")
    found = world.watch.touching(_path_nodes(world, rid), start, end)
    if found:
        return Failure(kind, f"{found[0].kind} on its path")
    if world.leader_change_during(start - AFTERMATH, end):
        return Failure(kind, "a leader change")
    return Failure(kind, None, "no fault touched its instance's nodes")


def check_timeout(
    world: World, result: ClientResult, job: RunnerJob | None, rid: str | None
) -> list[Violation]:
    """A request that timed out: the limit had really passed, and no event was
    waiting in its channel (a limit on the runner's progress, not the reader's)."""
    if rid is None or rid not in world.watch.timeouts:
        return []
    kind, at, waiting = world.watch.timeouts[rid]
    settings = world.plan.settings
    limit = {"ttft": settings.ttft_timeout, "idle": settings.idle_timeout}.get(
        kind, settings.request_timeout
    )
    problem = None
    if kind in ("ttft", "idle") and waiting:
        problem = f"{waiting} event(s) were waiting in its channel"
    elif kind in ("ttft", "total") and result.sent_at is not None and at < result.sent_at + limit:
        problem = f"only {at - result.sent_at:.4f}s after it was sent"
    elif kind == "idle" and job is not None:
        got = len(decode_tokens(result.text)[0])
        if 0 < got <= len(job.emit_times) and at < job.emit_times[got - 1] + limit:
            since = at - job.emit_times[got - 1]
            problem = f"{since:.4f}s after the runner emitted token {got - 1}"
    if problem is None and kind in ("ttft", "idle") and job is not None:
        problem = arrived_in_time(world, job, kind, at, limit)
    if problem is None:
        world.coverage[f"timeout_{kind}_checked"] += 1
        return []
    return [
        Violation(
            "spurious_timeout",
            f"({result.plan.dialect}) timed out ({kind}, limit {limit:g}s) at {at:.4f}s "
            f"although {problem}",
            result.plan.index,
            rid,
        )
    ]


def arrived_in_time(world: World, job: RunnerJob, kind: str, at: float, limit: float) -> str | None:
    """A first-token or idle limit that fired although the runner emitted an event
    that must have reached the node in time: within the limit's window before `at`,
    and at least the worst transit time (pipe, and link if relayed) before `at`.
    That event was read, which would have moved the deadline, or left waiting, which
    the node checks: either way this limit must not fire; if it did, the event was
    lost on the way. (Exempt: a link fault on its path, which may hold it.)"""
    s = world.plan.scenario
    path = world.watch.paths.get(job.request_id)
    relayed = path is not None and path.entry != path.owner
    transit = 2 * s.pipe_delay_max + 2 * world.plan.settings.link_delay_max * relayed + 1e-6
    if (
        relayed
        and path is not None
        and world.watch.link_faults(path.owner, path.entry, at - limit, at)
    ):
        return None
    times = list(job.emit_times)
    if job.end == "finished" and job.end_at is not None:
        times.append(job.end_at)
    window = (at - limit, at - transit) if kind == "idle" else (-math.inf, at - transit)
    late = [t for t in times if window[0] < t <= window[1]]
    if not late:
        return None
    what = "its first event" if kind == "ttft" else "an event"
    return f"the runner emitted {what} at {late[0]:.4f}s, in time to reach the node"


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


def gave_up(world: World, result: ClientResult, rid: str) -> tuple[float, str, bool] | None:
    """When the request was given up, why, and whether the news had to cross the
    client's HTTP link first (a disconnect, a cancel) or arose in the node (a time
    limit, a send timeout)."""
    timeout = world.watch.timeouts.get(rid)
    cut = None
    if result.stalled_at is not None:
        ids = [c for c, client in world.connection_client.items() if client == result.plan.index]
        times = [world.watch.send_timeouts[c] for c in ids if c in world.watch.send_timeouts]
        cut = min(times) if times else None
    candidates = []
    if result.ending == "left" and result.left_at is not None:
        candidates.append((result.left_at, "left", True))
    if result.cancel_status == 200 and result.cancel_sent_at is not None:
        candidates.append((result.cancel_sent_at, "cancelled", True))
    if timeout is not None:
        candidates.append((timeout[1], f"timed out ({timeout[0]})", False))
    if cut is not None:
        candidates.append((cut, "was cut off (send timeout)", False))
    return min(candidates) if candidates else None


def check_stopped(world: World, result: ClientResult, job: RunnerJob | None) -> list[Violation]:
    """Work given up on (its client left, its cancel was accepted, it timed out, its
    stalled reader was cut off) stops within a bounded number of runner steps."""
    # A cancel the node refused (404: no node has the request; 503: the node that
    # may have it could not be asked) leaves the request running, as it says.
    if job is None:
        return []
    given = gave_up(world, result, job.request_id)
    if given is None:
        return []
    at, why, over_http = given
    path = world.watch.paths.get(job.request_id)
    relayed = path is not None and path.entry != path.owner
    owner = result.plan.node
    # A cancel sent to another node reaches the owner over a link (CancelRequest).
    via = result.cancel_node if why == "cancelled" else None
    crossed = via is not None and via != owner
    queued = 0.0
    sent = world.watch.cancel_sent.get(job.request_id)
    arrived = world.watch.cancel_arrived.get(job.request_id)
    if relayed and sent is not None and arrived is not None:
        queued = max(0.0, arrived - sent - 2 * world.plan.settings.link_delay_max)
    latency, max_steps = stop_bound(world, relayed, crossed, over_http, queued)
    end = at + latency
    if (
        relayed and path is not None and world.watch.link_faults(path.owner, path.entry, at, end)
    ) or (crossed and via is not None and world.watch.link_faults(via, owner, at, end)):
        # The cancel crosses a link that was cut or held: it arrives when the link
        # is back (or the entry gives up on the owner); the end state checks that
        # the work stopped by then.
        return []
    out = []
    after = sum(1 for t in job.emit_times if t > at)
    late = sum(1 for t in job.emit_times if t > at + latency)
    if after > max_steps or late > 1:
        out.append(
            Violation(
                "runner_kept_going",
                f"the runner ran {after} steps for the request after it {why} at {at:.4f}s "
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
    small_buffers = world.plan.settings.relay_buffer < DEFAULT_RELAY_BUFFER
    for rid, (owner, at) in watch.peer_lost.items():
        path = watch.paths.get(rid)
        if path is None or path.entry == owner:
            continue
        failure = watch.failures.get(rid)
        if small_buffers and failure is not None and "stopped acknowledging" in failure[3]:
            continue  # the relay's buffer filled: an explicit end, by configuration
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
        if stats.gaps or (stats.overflows and not small_buffers):
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
