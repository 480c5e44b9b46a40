"""Coverage of paths: a named counter for every way a request can end and every
branch of the protocols between the parts ("sometimes" assertions, as Antithesis
calls them: each must be seen at least once in a sweep).

Counters come from what the nodes publish (the observer, their statistics), from
the faults the World injects, and from what the clients saw; `collect` adds the
clients' ones at the end of a run. `COUNTERS` is the catalogue: a sweep of at least
`MIN_SEEDS` seeds fails if a counter its scenario can produce stayed at zero, and
names it (`missing`). A counter a scenario cannot produce (no runner crashes in
`leader-change`, no links on a lone node) is not asked of it.
"""

from __future__ import annotations

from collections import Counter as Counts
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sim.scenario import EARLY_KINDS, EARLY_STATUS, Scenario

if TYPE_CHECKING:
    from sim.world import World

MIN_SEEDS = 1000

Needs = Callable[[Scenario], bool]


def always(s: Scenario) -> bool:
    return True


def cluster(s: Scenario) -> bool:
    return s.nodes > 1


def crashes(s: Scenario) -> bool:
    return s.runner_crashes


def node_faults(s: Scenario) -> bool:
    return s.nodes > 1 and "crash" in s.fault_kinds


def link_faults(s: Scenario) -> bool:
    return s.nodes > 1 and bool({"reset", "partition"} & set(s.fault_kinds))


@dataclass(frozen=True)
class Path:
    name: str
    what: str
    needs: Needs = always


def _early_paths() -> list[Path]:
    out = []
    for kind in EARLY_KINDS:
        status = EARLY_STATUS[kind]
        out.append(
            Path(
                f"keepalive_reused_after_{status}",
                f"a {status} answered before the app read the body, then the next request "
                "answered on the same connection",
            )
        )
        out.append(
            Path(
                f"keepalive_new_connection_after_{status}",
                f"a {status} answered before its body arrived closed the connection; the "
                "next request answered on a new one",
            )
        )
    return out


COUNTERS: tuple[Path, ...] = (
    # Admission and dispatch
    Path("admission_admitted", "a generation request admitted"),
    Path("admission_refused", "refused at capacity (429, Ollama's 503)"),
    Path("unavailable_before_dispatch", "refused up front: no ready instance (503)"),
    Path("dispatch_refused", "admitted, then the dispatch refused (runner unavailable)"),
    Path("remote_refused", "an entry node's runner could not take a peer's request", cluster),
    Path("request_relayed", "a request served through the token relay and a link", cluster),
    # Time limits
    Path("timeout_ttft", "no first token within the limit"),
    Path("timeout_idle", "no next token within the limit"),
    Path("timeout_total", "the request ran past its total limit"),
    # How a request's scope closed, on the node
    Path("request_ended_finished", "finished: its terminal event read"),
    Path("request_ended_failed", "failed: an error as its terminal event"),
    Path("request_ended_before_first", "given up before its first chunk (runner cancelled)"),
    Path("request_ended_mid_stream", "given up mid-stream (runner cancelled)"),
    # Clients
    Path("disconnect_before_first", "a client gone before its first chunk"),
    Path("disconnect_mid_stream", "a client gone mid-stream"),
    Path("disconnect_after_last", "a client gone right after its terminal event"),
    Path("cancel_local", "POST /v1/cancel answered by the request's own node"),
    Path("cancel_via_peer", "POST /v1/cancel answered through another node", cluster),
    Path("cancel_status_404", "a cancel of a request no node had any more"),
    Path("send_timeout", "a client that stopped reading cut off by the send timeout"),
    Path("server_backpressure", "a slow reader's full buffer held a server write"),
    Path("keepalive_received", "a streaming keep-alive during a wait"),
    *_early_paths(),
    Path("keepalive_pipelined", "a request pipelined behind an early answer, answered"),
    Path("keepalive_idle_closed", "an idle kept-alive connection closed by the node"),
    # Runners
    Path("runner_crash", "a runner crashed", crashes),
    Path("runner_crash_mid_stream", "a runner crashed while a request streamed", crashes),
    Path("runner_restart", "a single-rank runner restarted in place", crashes),
    Path("runner_hang", "a runner stopped stepping for a while"),
    # The relay between nodes
    Path("relay_ack_before_end", "an owner acknowledged events before the terminal", cluster),
    Path("relay_ack_trim", "an acknowledgement freed buffered events", cluster),
    Path("relay_resent", "events re-sent after a reconnect", link_faults),
    Path("relay_duplicates", "re-sent events the owner already had, dropped", link_faults),
    Path("relay_overflow", "an owner that stopped acknowledging: its buffer filled", cluster),
    Path("relay_unrouted_events", "events for a request the owner forgot: cancelled", cluster),
    Path("relay_resume_unknown", "a resume for a request the entry lacks: failed", cluster),
    Path("peer_lost_for_good", "a peer down past the grace: its requests failed", cluster),
    Path("remote_cancel_applied", "runner work stopped for a peer's request", cluster),
    # Links and cluster faults
    Path("outbox_backlog_16", "a link's outbox held 16 messages or more", cluster),
    Path("link_reset", "a link reset", link_faults),
    Path("partition_reset", "a partition that cuts", link_faults),
    Path("partition_hold", "a partition that holds the bytes", link_faults),
    Path("link_cut_mid_stream", "a link cut under a streaming request", link_faults),
    Path("node_crash_process", "a node's process died", node_faults),
    Path("node_crash_machine", "a node's machine vanished", node_faults),
    Path("node_crash_mid_stream", "a node died under a streaming request", node_faults),
    Path("leader_change", "the leader changed", cluster),
    Path("leader_change_mid_stream", "the leader changed while requests streamed", cluster),
    Path("stale_command_injected", "a deposed leader's delayed shard command", cluster),
    Path("stale_report_set_aside", "a leader set aside a report from before its term", cluster),
    Path("stale_report_differs", "...one that differed from the member's state", cluster),
    # BUGGIFY
    Path("buggify_dispatch_refused", "BUGGIFY: a dispatch refused"),
    Path("buggify_remote_refused", "BUGGIFY: a peer's request refused", cluster),
    Path("buggify_after_send_RemoteAck", "BUGGIFY: a link cut right after an ack", cluster),
    Path("buggify_after_send_RemoteGenerate", "BUGGIFY: a link cut right after a request", cluster),
    Path("buggify_after_send_RemoteCancel", "BUGGIFY: a link cut right after a cancel", cluster),
    # The windows the rule is about
    Path("chunk_before_client_read", "the runner emitted before the client read a byte"),
    Path("chunk_before_consumer_read", "a first chunk in its channel before anyone waited"),
    Path("fault_point_after_dispatch", "the after_dispatch fault point"),
    Path("fault_point_before_first_write", "the before_first_write fault point"),
)

NAMES = frozenset(p.name for p in COUNTERS)


def required(scenario: Scenario) -> list[str]:
    return [p.name for p in COUNTERS if p.needs(scenario)]


def missing(scenario: Scenario, coverage: Counts[str]) -> list[str]:
    return [name for name in required(scenario) if not coverage.get(name)]


def collect(world: World) -> None:
    """The counters the clients' results give, added at the end of a run."""
    coverage = world.coverage
    for result in world.results:
        plan = result.plan
        answered = result.ending == "complete" and result.status is not None
        if result.cancel_sent_at is not None and result.cancel_status == 200:
            coverage["cancel_via_peer" if result.cancel_node != plan.node else "cancel_local"] += 1
        if result.status == 503 and result.request_id is None and result.terminals:
            detail = getattr(result.terminals[0], "detail", "")
            if "at capacity" not in detail:
                coverage["unavailable_before_dispatch"] += 1
        for i, early in enumerate(result.early):
            status = EARLY_STATUS[early.kind]
            if early.status != status:
                continue
            # Was the next request (an early one, or the generation request) answered?
            later = result.early[i + 1 :]
            next_answered = later[0].status is not None if later else answered
            if not next_answered:
                continue
            if early.reused:
                coverage[f"keepalive_reused_after_{status}"] += 1
            else:
                coverage[f"keepalive_new_connection_after_{status}"] += 1
            if early.pipelined:
                coverage["keepalive_pipelined"] += 1
        if result.idle_closed_at is not None:
            coverage["keepalive_idle_closed"] += 1
