"""Known bugs, patched into the real code at run time, that the simulator must catch.

Each mutant monkeypatches production classes for the duration of a `with` block
and restores them after. `python -m sim --mutants` runs each against the sweep's
seeds until the invariants fail, and reports how many seeds that took.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from exo_trio import cluster_state
from exo_trio.api import generation as generation_module
from exo_trio.api.admission import Admission
from exo_trio.api.keep_alive import ConnectionReuse
from exo_trio.api.timeouts import Deadline, RequestTimeouts
from exo_trio.cluster import Cluster
from exo_trio.cluster_messages import (
    InstanceStatus,
    NodeReport,
    RemoteAck,
    RemoteGenerate,
    RemoteResume,
    VoteReply,
)
from exo_trio.net.links import PeerLinks
from exo_trio.node import Node
from exo_trio.router import Router
from exo_trio.runner.framing import encode_frame
from exo_trio.streams import RequestStream, StreamRegistry
from exo_trio.token_relay import TokenRelay
from exo_trio.types import ChunkGenerated, GenerationEvent, GenerationFinished, TextGeneration
from exo_trio.worker import Worker


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    apply: Callable[[], AbstractContextManager[None]]
    # The scenario (sim/scenario.py SCENARIOS) a hunt uses unless told otherwise:
    # the one that provokes the bug (None: the default).
    scenario: str | None = None
    # Hunted by --mutants (caught within 20 seeds). A rare race is not: it is kept
    # for `--mutant NAME` and for its regression-corpus entry.
    hunt: bool = True
    # Its path is reached by guided exploration (sim/explore.py), not within 20
    # fresh seeds: --mutants hunts it with up to a minute of exploration instead.
    explore: bool = False


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# ---- register after dispatch (exo's bug) ----


class _LateStream:
    """The request's channel, registered only when the response body first reads
    from it: whatever the runner sent before that went to an unknown id."""

    def __init__(self, register: Callable[[], RequestStream]) -> None:
        self._register = register
        self._stream: RequestStream | None = None

    @property
    def finished(self) -> bool:
        return self._stream is not None and self._stream.finished

    async def receive(self) -> GenerationEvent:
        if self._stream is None:
            self._stream = self._register()
        return await self._stream.receive()

    def __aiter__(self) -> _LateStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self.finished:
            raise StopAsyncIteration
        return await self.receive()


def register_after_dispatch() -> AbstractContextManager[None]:
    """`registry.open` hands back a placeholder; the real registration happens on
    the first read, after Node.open_generation has dispatched (exo's order)."""
    real = StreamRegistry.open

    def open_(self: StreamRegistry, request_id: str, max_tokens: int) -> _LateStream:
        return _LateStream(lambda: real(self, request_id, max_tokens))

    return patched(StreamRegistry, "open", open_)


# ---- a missing unregister ----


def missing_unregister() -> AbstractContextManager[None]:
    def close(self: StreamRegistry, request_id: str) -> None:
        return None

    return patched(StreamRegistry, "close", close)


def client_id_kept() -> AbstractContextManager[None]:
    real = Node.open_generation

    @contextmanager
    def open_generation(self: Node, command: TextGeneration) -> Iterator[RequestStream]:
        with real(self, command) as stream:
            yield stream
        if command.client_id is not None:  # the clean-up forgotten
            self._client_ids[command.client_id] = command.request_id

    return patched(Node, "open_generation", open_generation)


# ---- cancellation that never reaches the runner ----


def cancel_not_sent() -> AbstractContextManager[None]:
    def cancel(self: Worker, request_id: str) -> None:
        job = self.jobs.get(request_id)
        if job is not None:
            job.cancelled = True  # remembered, never sent

    return patched(Worker, "cancel", cancel)


# ---- a dropped terminal event ----


def dropped_terminal() -> AbstractContextManager[None]:
    real = Worker._handle

    def handle(self: Worker, message: Any) -> bool:
        if isinstance(message, GenerationFinished) and message.completion_tokens % 2:
            self.jobs.pop(message.request_id, None)  # the job ends, the event is lost
            return False
        return real(self, message)

    return patched(Worker, "_handle", handle)


# ---- a reused sequence number ----


def reused_seq() -> AbstractContextManager[None]:
    real = Worker._handle

    def handle(self: Worker, message: Any) -> bool:
        if isinstance(message, ChunkGenerated) and message.seq == 3:
            message = ChunkGenerated(
                request_id=message.request_id, seq=2, token=message.token, text=message.text
            )
        return real(self, message)

    return patched(Worker, "_handle", handle)


# ---- beyond the list ----


def small_channel() -> AbstractContextManager[None]:
    """The per-request buffer sized for a few events, not max_tokens + 1: a slow
    reader overflows it."""
    real = StreamRegistry.open

    def open_(self: StreamRegistry, request_id: str, max_tokens: int) -> RequestStream:
        return real(self, request_id, min(max_tokens, 4))

    return patched(StreamRegistry, "open", open_)


def cancel_endpoint_forgets_runner() -> AbstractContextManager[None]:
    """POST /v1/cancel ends the client's stream but never tells the runner."""
    real = Node.cancel_request

    def cancel_request(self: Node, request_id: str) -> bool:
        dispatcher: Any = self.dispatcher
        dispatcher.cancel = lambda *args: None  # shadows the method for this call
        try:
            return real(self, request_id)
        finally:
            del dispatcher.cancel

    return patched(Node, "cancel_request", cancel_request)


# ---- the cluster ----


def relay_no_resend() -> AbstractContextManager[None]:
    """After a reconnect nothing lost with the old link is sent again: the entry
    node neither re-sends its buffer nor answers the owner's RemoteResume."""

    def on_peer_up(self: TokenRelay, peer: str) -> None:
        for request_id, route in self.routes.items():
            if route.entry_node == peer:
                self._send(peer, RemoteResume(request_id=request_id, next_event=route.next_event))

    def on_resume(self: TokenRelay, peer: str, message: RemoteResume) -> None:
        return None

    return _patched_all(
        (TokenRelay, "on_peer_up", on_peer_up), (TokenRelay, "on_resume", on_resume)
    )


def resume_ignores_unknown() -> AbstractContextManager[None]:
    """A RemoteResume for a request the entry node does not know is ignored (as it
    was before the simulator found it): a request whose RemoteGenerate was lost
    with a link, or whose entry node restarted within the grace, hangs."""
    real = TokenRelay.on_resume

    def on_resume(self: TokenRelay, peer: str, message: RemoteResume) -> None:
        if message.request_id in self.outgoing:
            real(self, peer, message)

    return patched(TokenRelay, "on_resume", on_resume)


def leader_judges_early() -> AbstractContextManager[None]:
    """A leader judges instances before every member's report is in (a real bug,
    fixed before the simulator ran multi-node): a member whose report has not
    arrived yet looks lost, and its healthy instances are torn down."""
    real = Cluster._lead

    def lead(self: Cluster, now: float) -> None:
        members = self.members
        self.members = (members & set(self.reports)) | {self.node_id}
        try:
            real(self, now)
        finally:
            self.members = members

    return patched(Cluster, "_lead", lead)


def no_fencing() -> AbstractContextManager[None]:
    """Shard commands of any term are obeyed: a deposed leader's delayed command
    starts or stops shards."""

    def fenced(self: Cluster, term: int, what: str, peer: str) -> bool:
        self.term = max(self.term, term)
        return False

    return patched(Cluster, "_fenced", fenced)


def worker_drops_output() -> AbstractContextManager[None]:
    """A write to a dying runner cancels the whole session at once, so what the
    runner wrote before it died is never read (found by the single-node simulator,
    fixed; sim/corpus keeps its reproduction)."""

    async def write_commands(
        self: Worker,
        stream: trio.abc.SendStream,
        commands: trio.MemoryReceiveChannel[Any],
        scope: trio.CancelScope,
    ) -> None:
        async for command in commands:
            try:
                await stream.send_all(encode_frame(command))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.last_error = f"runner input closed: {exc}"
                scope.cancel()
                return

    write_commands.__qualname__ = Worker._write_commands.__qualname__  # a service task
    return patched(Worker, "_write_commands", write_commands)


# ---- the cluster bugs the simulator found, as they were (regressions) ----


def relay_waits_for_resume() -> AbstractContextManager[None]:
    """After a reconnect the entry node re-sends lost events only when the owner's
    RemoteResume arrives, while new events go out at once: the owner sees a newer
    event first and fails the request with "lost events" (found: gap)."""

    def on_peer_up(self: TokenRelay, peer: str) -> None:
        for request_id, route in self.routes.items():
            if route.entry_node == peer:
                self._send(peer, RemoteResume(request_id=request_id, next_event=route.next_event))

    return patched(TokenRelay, "on_peer_up", on_peer_up)


def unknown_events_ignored() -> AbstractContextManager[None]:
    """Events for a request the owner no longer routes are only counted: when the
    owner's cancel or last ack was lost with a link, or the owner restarted, the
    entry node keeps the request's buffer (and its runner work) forever."""
    real = TokenRelay.on_events

    def on_events(self: TokenRelay, peer: str, message: Any) -> list[Any]:
        if message.request_id not in self.routes:
            self._stats.late += len(message.events)
            return []
        return real(self, peer, message)

    return patched(TokenRelay, "on_events", on_events)


def missing_rank_unnoticed() -> AbstractContextManager[None]:
    """A rank its node no longer reports (the node restarted before its link timed
    out) leaves the instance "loading" forever instead of failed: its requests
    hang on the surviving ranks, and the model is never placed again."""
    real = cluster_state._status

    def status(spec: Any, seen: Any, reports: Any, pending: Any, now: float) -> Any:
        result = real(spec, seen, reports, pending, now)
        if result.state == "failed" and " is gone from node " in (result.error or ""):
            return InstanceStatus(spec=spec, state="loading" if seen else "placing")
        return result

    return patched(cluster_state, "_status", status)


def pending_outlives_peer() -> AbstractContextManager[None]:
    """A placement still starting on a peer that went down keeps waiting (120 s)
    for that peer's shard, which a restarted peer never starts."""
    real = Cluster.on_peer_down

    def on_peer_down(self: Cluster, peer_id: str, reason: str) -> None:
        pending = dict(self.pending)
        real(self, peer_id, reason)
        self.pending.update({k: v for k, v in pending.items() if k in self.pending})

    return patched(Cluster, "on_peer_down", on_peer_down)


def new_leader_keeps_term() -> AbstractContextManager[None]:
    """A new leader keeps the term it counted itself (a restarted node starts from
    0 again) even if a member granted that term to another leader: the member's
    refusal is taken for a grant, and two leaders claim one term."""
    real = Cluster._handlers[VoteReply]

    def on_vote_reply(self: Cluster, peer: str, reply: VoteReply) -> None:
        real(self, peer, VoteReply(term=reply.term, granted=True, known=reply.term))

    return patched(Cluster, "_handlers", {**Cluster._handlers, VoteReply: on_vote_reply})


def term_granted_twice() -> AbstractContextManager[None]:
    """A node grants a term it already granted to another leader (terms counted,
    not voted for): in a non-transitive partition (n0 and n1 cut apart, n2
    reaching both) n0 and n1 both lead, derive the same next term, and n2 obeys
    both."""

    def may_grant(known: int, vote: Any, term: int, candidate: str) -> bool:
        return term >= known

    return patched(cluster_state, "may_grant", may_grant)


# ---- paths the swarm, BUGGIFY and the keep-alive clients reach ----


def refused_dispatch_leaks_channel() -> AbstractContextManager[None]:
    """A request whose dispatch is refused after it was registered (its instance's
    runner died, its link dropped, just then) leaves its channel registered: the
    clean-up covers only a dispatched request."""

    @contextmanager
    def open_generation(self: Node, command: TextGeneration) -> Iterator[RequestStream]:
        rid = command.request_id
        stream = self.registry.open(rid, command.params.max_tokens)
        handle = self.dispatcher.dispatch(command)  # raising here skips the clean-up
        self._handles[rid] = handle
        if command.client_id is not None:
            self._client_ids[command.client_id] = rid
        try:
            yield stream
        finally:
            if command.client_id is not None:
                self._client_ids.pop(command.client_id, None)
            self._handles.pop(rid, None)
            if stream.finished:
                self.dispatcher.finished(rid)
            else:
                self.dispatcher.cancel(rid, handle)
            self.registry.close(rid)

    return patched(Node, "open_generation", open_generation)


def ack_runs_ahead() -> AbstractContextManager[None]:
    """The owner's acknowledgement before the end counts one event more than it
    has: the entry drops an event still in flight from its buffer, and when the link
    dies just then it cannot send it again."""
    real = TokenRelay.on_events

    def on_events(self: TokenRelay, peer: str, message: Any) -> list[Any]:
        route = self.routes.get(message.request_id)
        before = route.acked if route is not None else 0
        out = real(self, peer, message)
        route = self.routes.get(message.request_id)
        if route is not None and route.acked != before:
            self._send(peer, RemoteAck(request_id=message.request_id, upto=route.acked + 1))
        return out

    return patched(TokenRelay, "on_events", on_events)


def outbox_drops_when_backed_up() -> AbstractContextManager[None]:
    """A link whose outbox holds 16 messages drops new ones (a bounded outbox that
    sheds load silently): events between nodes are lost without the link dying."""
    real = PeerLinks.send

    def send(self: PeerLinks[Any], peer_id: str, message: Any) -> bool:
        if self.backlog(peer_id) >= 16:
            return True  # "sent"
        return real(self, peer_id, message)

    return patched(PeerLinks, "send", send)


def idle_limit_from_first_token() -> AbstractContextManager[None]:
    """The idle limit is measured from the first token instead of the last: a request
    streaming steadily times out once the limit passes after its first token."""
    real = RequestTimeouts.next_deadline

    def next_deadline(self: RequestTimeouts, timing: Any) -> Deadline | None:
        deadline = real(self, timing)
        if deadline is not None and deadline.kind == "idle" and timing.first_token is not None:
            return Deadline(timing.first_token + self.idle, "idle", self.idle)
        return deadline

    return patched(RequestTimeouts, "next_deadline", next_deadline)


def timeout_ignores_waiting_events() -> AbstractContextManager[None]:
    """(Found by the simulator, fixed.) A time limit on the runner's progress fires
    although the event it waited for is already in the channel (the reader was late,
    not the runner)."""

    def poll(self: RequestStream) -> None:
        return None

    return patched(RequestStream, "poll", poll)


def timeout_cancels_late() -> AbstractContextManager[None]:
    """(Found by the simulator, fixed.) A timed-out request's runner work is
    cancelled only once its client has been sent the error: a slow client keeps the
    runner generating for it meanwhile."""

    def stop_now(generation: Any) -> bool:
        return False  # left to the generator's `finally`

    return patched(generation_module, "stop_now", stop_now)


def leader_takes_stale_reports() -> AbstractContextManager[None]:
    """A new leader judges instances on a member's report from before its term (it
    may predate shards the member has since started or stopped)."""

    def on_report(self: Cluster, peer: str, report: NodeReport) -> None:
        if self.leader != self.node_id or peer not in self.members:
            return
        if report.term > self.term:
            self.term = report.term
            self.changed()
        self.reports[peer] = report

    return patched(Cluster, "_handlers", {**Cluster._handlers, NodeReport: on_report})


def early_answer_hangs() -> AbstractContextManager[None]:
    """(Found by the simulator, fixed.) hypercorn's work after a response (readying
    the connection for the next request, its keep-alive timer, closing it) is cut
    short by quart-trio's cancellation: an answer given before the request's body
    arrived leaves the connection half-open, the next request on it never answered;
    and idle connections are never closed."""

    async def call(self: ConnectionReuse, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    return patched(ConnectionReuse, "__call__", call)


def overflow_keeps_runner() -> AbstractContextManager[None]:
    """(Found by the simulator, fixed.) When the owner stops acknowledging and the
    entry's buffer fills, the request is failed but its runner work goes on; once the
    owner acknowledged the failure, the runner's next events arrive for an unknown
    request."""
    real = TokenRelay.relay_event

    def relay_event(self: TokenRelay, event: Any) -> str:
        outcome = real(self, event)
        if outcome == "overflow":
            self._cancelled.pop(event.request_id, None)
            return "relayed"
        return outcome

    return patched(TokenRelay, "relay_event", relay_event)


def remote_refusal_dropped() -> AbstractContextManager[None]:
    """An entry node whose runner cannot take a peer's request drops it silently
    instead of answering with a failure: the owner's client waits forever."""
    real = Router._handlers[RemoteGenerate]

    def on_remote_generate(self: Router, peer: str, message: RemoteGenerate) -> None:
        worker = self.shards.worker(message.instance_id)
        refused = worker is None or not worker.ready
        if refused or self._faults.fire("remote_refused", message.command.request_id):
            return
        real(self, peer, message)

    return patched(Router, "_handlers", {**Router._handlers, RemoteGenerate: on_remote_generate})


def admission_refusal_takes_slot() -> AbstractContextManager[None]:
    """A request refused at capacity still takes an admission slot, never given
    back: the node refuses more and more until it serves nobody."""
    real = Admission.admit

    def admit(self: Admission) -> None:
        if self.in_flight >= self.limit:
            self.node.exchanges += 1
            self.node.metrics.in_flight.inc()
        real(self)

    return patched(Admission, "admit", admit)


@contextmanager
def _patched_all(*patches: tuple[Any, str, Any]) -> Iterator[None]:
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        Mutant(
            "register_after_dispatch",
            "the channel is registered when the body is first read, after dispatch (exo)",
            register_after_dispatch,
        ),
        Mutant("missing_unregister", "a closed request is never unregistered", missing_unregister),
        Mutant(
            "client_id_kept",
            "the client's name for a request (X-Request-Id) outlives the request",
            client_id_kept,
        ),
        Mutant(
            "cancel_not_sent",
            "cancellation is recorded but never reaches the runner",
            cancel_not_sent,
        ),
        Mutant(
            "dropped_terminal",
            "the worker drops some GenerationFinished events",
            dropped_terminal,
        ),
        Mutant("reused_seq", "the relay reuses a chunk's sequence number", reused_seq),
        Mutant(
            "small_channel", "the request channel holds 4 events, not max_tokens + 1", small_channel
        ),
        Mutant(
            "cancel_endpoint_forgets_runner",
            "POST /v1/cancel ends the stream but leaves the runner generating",
            cancel_endpoint_forgets_runner,
            scenario="clients",
        ),
        Mutant(
            "worker_drops_output",
            "a worker whose runner input breaks stops reading the runner's last output",
            worker_drops_output,
            hunt=False,
        ),
        Mutant(
            "relay_no_resend",
            "the token relay re-sends nothing lost with a link after a reconnect",
            relay_no_resend,
        ),
        Mutant(
            "resume_ignores_unknown",
            "a resume for a request the entry node does not know is ignored",
            resume_ignores_unknown,
            scenario="node-restart",
        ),
        Mutant(
            "leader_judges_early",
            "a leader judges instances before every member's report is in",
            leader_judges_early,
            scenario="leader-change",
        ),
        Mutant(
            "no_fencing",
            "shard commands from stale terms are obeyed",
            no_fencing,
            scenario="leader-change",
        ),
        Mutant(
            "relay_waits_for_resume",
            "after a reconnect lost events are re-sent only on the owner's resume",
            relay_waits_for_resume,
            hunt=False,
        ),
        Mutant(
            "unknown_events_ignored",
            "events for a request the owner no longer routes are only counted",
            unknown_events_ignored,
            hunt=False,
        ),
        Mutant(
            "missing_rank_unnoticed",
            "a rank its restarted node no longer reports leaves the instance loading",
            missing_rank_unnoticed,
            scenario="node-restart",
        ),
        Mutant(
            "pending_outlives_peer",
            "a placement starting on a lost peer waits for it anyway",
            pending_outlives_peer,
            hunt=False,
        ),
        Mutant(
            "new_leader_keeps_term",
            "a new leader keeps a term its members saw under another leader",
            new_leader_keeps_term,
            hunt=False,
        ),
        Mutant(
            "refused_dispatch_leaks_channel",
            "a request whose dispatch is refused after registering stays registered",
            refused_dispatch_leaks_channel,
        ),
        Mutant(
            "ack_runs_ahead",
            "the owner acknowledges one event more than it has",
            ack_runs_ahead,
            scenario="relay",
        ),
        Mutant(
            "outbox_drops_when_backed_up",
            "a link's outbox drops messages once 16 wait",
            outbox_drops_when_backed_up,
            scenario="relay",
        ),
        Mutant(
            "idle_limit_from_first_token",
            "the idle limit is measured from the first token, not the last",
            idle_limit_from_first_token,
            scenario="timeouts",
        ),
        Mutant(
            "timeout_ignores_waiting_events",
            "a time limit fires with the awaited event already in the channel",
            timeout_ignores_waiting_events,
            scenario="timeouts",
        ),
        Mutant(
            "timeout_cancels_late",
            "a timed-out request's runner work is cancelled only after the client has the error",
            timeout_cancels_late,
            scenario="timeouts",
        ),
        Mutant(
            "leader_takes_stale_reports",
            "a leader judges on reports from before its term",
            leader_takes_stale_reports,
            scenario="leader-change",
        ),
        Mutant(
            "early_answer_hangs",
            "an early answer leaves its connection half-open; idle ones are never closed",
            early_answer_hangs,
            scenario="clients",
        ),
        Mutant(
            "overflow_keeps_runner",
            "an entry whose relay buffer overflowed leaves the runner generating",
            overflow_keeps_runner,
            scenario="relay",
        ),
        Mutant(
            "remote_refusal_dropped",
            "an entry drops a peer's request its runner cannot take, unanswered",
            remote_refusal_dropped,
        ),
        Mutant(
            "admission_refusal_takes_slot",
            "a request refused at capacity keeps an admission slot",
            admission_refusal_takes_slot,
            scenario="clients",
        ),
        Mutant(
            "term_granted_twice",
            "a node grants a term it already granted to another leader",
            term_granted_twice,
            scenario="leader-change",
            hunt=False,
        ),
    )
}
