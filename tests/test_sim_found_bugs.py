"""The cluster bugs the multi-node simulator found, each pinned by a direct test of
the fixed code (the simulator's own regression entries are in sim/corpus/, each
replayed under a mutant that restores the old code; see docs/simulator.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from exo_trio import cluster_state as decide
from exo_trio.cluster import Cluster, ClusterSettings
from exo_trio.cluster_messages import (
    ClusterMessage,
    ClusterView,
    InstanceSpec,
    ModelInfo,
    NodeReport,
    RemoteCancel,
    RemoteEvents,
    RemoteGenerate,
    RemoteResume,
    ShardSpec,
    ShardStatus,
    StartShard,
    StopShard,
    VoteReply,
    VoteRequest,
)
from exo_trio.streams import StreamRegistry
from exo_trio.token_relay import TokenRelay
from exo_trio.types import (
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)
from tests.cluster_parts import cluster_parts

# ---- the token relay ----


class Wire:
    """Owner "o" and entry "e" relays; messages wait in `in_flight` until pumped,
    and a link that dies loses what it holds."""

    def __init__(self) -> None:
        self.up = True
        self.in_flight: list[tuple[str, ClusterMessage]] = []
        self.registry = StreamRegistry()
        self.owner = TokenRelay("o", self._sender("e"), ack_every=100)
        self.entry = TokenRelay("e", self._sender("o"))

    def _sender(self, target: str) -> Callable[[str, ClusterMessage], bool]:
        def send(peer: str, message: ClusterMessage) -> bool:
            if not self.up:
                return False
            self.in_flight.append((target, message))
            return True

        return send

    def cut(self) -> None:
        """The link dies with whatever is on it."""
        self.in_flight.clear()
        self.up = False

    def pump(self) -> None:
        while self.in_flight:
            target, message = self.in_flight.pop(0)
            relay, peer = (self.owner, "e") if target == "o" else (self.entry, "o")
            if isinstance(message, RemoteGenerate):
                relay.accept(peer, message)
            elif isinstance(message, RemoteEvents):
                for event in relay.on_events(peer, message):
                    self.registry.deliver(event)
            elif isinstance(message, RemoteCancel):
                relay.on_cancel(peer, message)
            elif isinstance(message, RemoteResume):
                relay.on_resume(peer, message)
            else:
                relay.on_ack(peer, message)  # type: ignore[arg-type]

    def events(self, rid: str) -> list[GenerationEvent]:
        stream = self.registry._entries[rid].stream
        got: list[GenerationEvent] = []
        while True:
            try:
                event = stream._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return got
            stream._check(event)  # raises on a gap or a duplicate
            got.append(event)


def command(rid: str, n: int = 8) -> TextGeneration:
    return TextGeneration(
        request_id=rid, model="m", prompt_tokens=[1], params=SamplingParams(max_tokens=n)
    )


def chunk(rid: str, seq: int) -> ChunkGenerated:
    return ChunkGenerated(request_id=rid, seq=seq, token=seq, text=str(seq))


def test_after_a_reconnect_lost_events_go_out_before_new_ones() -> None:
    """Found: the entry sent new events on the new link at once but re-sent the
    ones lost with the old link only when the owner's RemoteResume arrived, so the
    owner saw a gap and failed the request ("lost events")."""
    wire = Wire()
    wire.registry.open("r", 8)
    wire.owner.dispatch("e", "inst", command("r"))
    wire.pump()
    wire.entry.relay_event(chunk("r", 0))
    wire.pump()
    wire.cut()
    wire.entry.relay_event(chunk("r", 1))  # lost: no link
    wire.up = True
    wire.entry.on_peer_up("o")  # the entry's side of the new link comes up first...
    wire.entry.relay_event(chunk("r", 2))  # ...and a new event goes out at once
    wire.owner.on_peer_up("e")  # the owner's resume arrives later
    wire.pump()
    assert [e.seq for e in wire.events("r")] == [0, 1, 2]  # type: ignore[union-attr]
    assert wire.owner.statistics().gaps == 0


def test_a_resume_for_a_request_the_entry_does_not_know_ends_it_explicitly() -> None:
    """Found: a RemoteGenerate lost with a link (or an entry node restarted within
    the grace) left the request waiting forever: the resume was ignored."""
    wire = Wire()
    wire.registry.open("r", 8)
    wire.owner.dispatch("e", "inst", command("r"))
    wire.cut()  # the RemoteGenerate was still on the link
    wire.up = True
    wire.owner.on_peer_up("e")
    wire.pump()
    (event,) = wire.events("r")
    assert isinstance(event, GenerationFailed) and event.kind == "peer_lost"
    assert not wire.owner.routes


def test_events_for_a_request_the_owner_forgot_make_the_entry_drop_it() -> None:
    """Found: a RemoteCancel (or the last RemoteAck) lost with a link, or an owner
    that restarted, left the entry node buffering the request forever."""
    wire = Wire()
    wire.registry.open("r", 8)
    wire.owner.dispatch("e", "inst", command("r"))
    wire.pump()
    wire.owner.cancel("r")
    wire.cut()  # the RemoteCancel is lost
    wire.up = True
    wire.entry.on_peer_up("o")
    wire.entry.relay_event(chunk("r", 0))  # the runner goes on
    wire.pump()
    assert not wire.entry.outgoing  # the owner answered with a RemoteCancel

    wire.registry.open("f", 1)
    wire.owner.dispatch("e", "inst", command("f", 1))
    wire.pump()
    wire.entry.relay_event(chunk("f", 0))
    finished = GenerationFinished(
        request_id="f", chunks=1, finish_reason="length", prompt_tokens=1, completion_tokens=1
    )
    wire.entry.relay_event(finished)
    while wire.in_flight and wire.in_flight[0][0] == "o":
        _target, message = wire.in_flight.pop(0)
        for event in wire.owner.on_events("e", message):  # type: ignore[arg-type]
            wire.registry.deliver(event)
    assert not wire.owner.routes and "f" in wire.entry.outgoing
    wire.cut()  # the owner's last ack is lost
    wire.up = True
    wire.entry.on_peer_up("o")  # reconnect: the finished tail goes out again
    wire.pump()
    assert not wire.entry.outgoing


# ---- the cluster ----

MODEL = ModelInfo(
    id="m",
    size_bytes=1000,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    supports_tensor=True,
    context_length=4096,
)


def spec(instance_id: str, nodes: tuple[str, ...]) -> InstanceSpec:
    return InstanceSpec(
        instance_id=instance_id,
        model="m",
        sharding="pipeline",
        backend="ring",
        shards=tuple(
            ShardSpec(node_id=n, rank=r, start_layer=r, end_layer=r + 1, host=n, port=1)
            for r, n in enumerate(nodes)
        ),
        auto=True,
    )


def report(node_id: str, term: int, shards: tuple[ShardStatus, ...] = ()) -> NodeReport:
    return NodeReport(
        node_id=node_id,
        term=term,
        memory_free=10**9,
        models=(MODEL,),
        serve=("m",),
        shards=shards,
        host=node_id,
        free_ports=(1,),
    )


def test_a_rank_its_node_no_longer_reports_fails_the_instance() -> None:
    """Found: a node that restarted before its link timed out (a machine crash) no
    longer lists its rank; the instance stayed "loading" forever, its requests
    hung on the surviving ranks and the model was never placed again."""
    inst = spec("i", ("a", "b"))
    reports = {
        "a": report("a", 1, (ShardStatus(instance=inst, rank=0, state="ready"),)),
        "b": report("b", 1),  # restarted: its rank is gone
    }
    (status,) = decide.instance_statuses(reports, {}, now=1.0)
    assert status.state == "failed" and "rank 1 is gone from node b" in (status.error or "")
    # While the leader is still placing it, a missing rank is just not started yet.
    pending = {"i": decide.Pending(inst, deadline=100.0)}
    (status,) = decide.instance_statuses(reports, pending, now=1.0)
    assert status.state == "loading"


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []

    def send(self, peer: str, message: Any) -> bool:
        self.messages.append((peer, message))
        return True


def cluster(node_id: str = "a") -> tuple[Cluster, Sent]:
    links = Sent()
    parts = cluster_parts(
        node_id, links, models={"m": MODEL}, serve=("m",), free_ports=lambda: (1,)
    )
    return parts.cluster, links


def test_a_placement_starting_on_a_lost_peer_gives_up_at_once() -> None:
    """Found: a peer that went down (and came back restarted) while an instance was
    being placed on it never started its rank; the placement waited out its 120 s
    start timeout."""

    async def main() -> None:
        leader, _ = cluster()
        leader.pending["i"] = decide.Pending(spec("i", ("a", "b")), deadline=120.0)
        leader.on_peer_down("b", "link lost")
        assert leader.pending["i"].deadline <= trio.current_time()

    trio.run(main, clock=trio.testing.MockClock())


def test_a_start_refused_as_stale_is_sent_again_in_the_newer_term() -> None:
    """Found (three nodes): a follower that had seen a higher term refused the
    leader's StartShard, and nothing sent it again: the placement waited 120 s.
    (Now the leader asks for a newer term and starts its placements again in it,
    on each member as the member grants it.)"""

    async def main() -> None:
        leader, links = cluster()
        leader.members |= {"b"}
        leader._tick()  # leads, asks b for term 1
        leader.on_message("b", VoteReply(term=1, granted=True, known=1))
        leader.pending["i"] = decide.Pending(spec("i", ("a", "b")), deadline=120.0)
        leader.on_message("b", report("b", 2))  # b granted term 2 to another leader
        leader._tick()
        assert links.messages[-1] == ("b", VoteRequest(term=3))
        leader.on_message("b", VoteReply(term=3, granted=True, known=3))
        starts = [(p, m) for p, m in links.messages if isinstance(m, StartShard)]
        assert leader.term == 3 and [(p, m.term) for p, m in starts] == [("b", 3)]

    trio.run(main, clock=trio.testing.MockClock())


def test_a_new_leader_takes_a_term_above_what_its_members_saw() -> None:
    """Found (three nodes): a restarted node counts terms from 0 again, led in a
    term its members had already seen under another leader: two leaders, one term.
    (Now the member refuses that term, and the leader asks for one above.)"""

    async def main() -> None:
        leader, links = cluster()
        leader.members |= {"b"}
        leader._tick()  # becomes leader: asks b for term 1
        assert leader.leader == "a" and leader.term == 1
        # b granted term 1 to someone else (and knows term 1).
        leader.on_message("b", VoteReply(term=1, granted=False, known=1))
        leader._tick()
        assert leader.term == 2 and links.messages[-1] == ("b", VoteRequest(term=2))
        assert not [m for _, m in links.messages if isinstance(m, ClusterView)]

    trio.run(main, clock=trio.testing.MockClock())


def test_a_leader_judges_only_on_reports_sent_in_its_term() -> None:
    """Found (three nodes): a leader in a new term judged with a member's report
    from before the member granted that term (from before it started a rank the
    leader had placed), found the rank "gone" and tore a healthy instance down."""

    async def main() -> None:
        leader, links = cluster()
        leader.members |= {"b"}
        leader._tick()  # asks b for term 1
        leader.on_message("b", report("b", 0))  # sent before b granted it
        leader.on_message("b", VoteReply(term=1, granted=True, known=1))
        leader._tick()
        assert "b" not in leader.reports
        assert not [m for _, m in links.messages if isinstance(m, ClusterView)]
        leader.on_message("b", report("b", 1))
        leader._tick()
        assert [p for p, m in links.messages if isinstance(m, ClusterView)] == ["b"]

    trio.run(main, clock=trio.testing.MockClock())


def test_a_restarted_leader_decides_nothing_before_its_peers_are_linked() -> None:
    """Found (three nodes): a restarted leader linked to one peer a few ms before
    the other, judged the other (not linked yet) lost and stopped a healthy
    instance across the two. It now waits to settle: every expected peer linked,
    or `settle` seconds."""

    async def main() -> None:
        leader, links = cluster()
        leader.settings = ClusterSettings(expected_peers=2, settle=10.0)
        leader.members |= {"b"}
        leader._tick()  # asks b for term 1
        leader.on_message("b", VoteReply(term=1, granted=True, known=1))
        inst = spec("i", ("b", "c"))
        leader.on_message("b", report("b", 1, (ShardStatus(instance=inst, rank=0, state="ready"),)))
        leader._tick()
        assert not [m for _, m in links.messages if isinstance(m, StopShard)]
        await trio.sleep(10)  # c never comes: now c's rank is lost
        leader._tick()
        stops = [(p, m.instance_id) for p, m in links.messages if isinstance(m, StopShard)]
        assert stops == [("b", "i")]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
