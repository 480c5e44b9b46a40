"""Cluster logic (leader, placement, routing, failure) with in-memory links and
fake runners: several Cluster objects in one trio run under a MockClock."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
import trio.testing

from exo_trio import cluster_state as decide
from exo_trio.cluster import Cluster, ClusterSettings
from exo_trio.cluster_messages import (
    ClusterMessage,
    ClusterView,
    InstanceSpec,
    ModelInfo,
    PlaceRequest,
    StartShard,
    StopShard,
)
from exo_trio.daemon import load_vote, save_vote
from exo_trio.node import ModelCard, Node
from exo_trio.peer_messages import PeerMessages
from exo_trio.seams import Seams
from exo_trio.types import (
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)
from sim.fake_runner import FakeRunner
from tests.cluster_parts import cluster_parts

MODEL = ModelInfo(
    id="m",
    size_bytes=10_000,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    supports_tensor=True,
    context_length=4096,
)


@dataclass
class FakeConn:
    stream: trio.abc.Stream
    pid: int | None = None

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Net:
    """Directed in-memory links between clusters, each delivered by its own task so
    messages from one peer arrive in order and never re-enter the sender."""

    nursery: trio.Nursery
    clusters: dict[str, Cluster] = field(default_factory=dict)
    inboxes: dict[str, PeerMessages] = field(default_factory=dict)
    channels: dict[tuple[str, str], trio.MemorySendChannel[ClusterMessage]] = field(
        default_factory=dict
    )
    cut: set[frozenset[str]] = field(default_factory=set)

    def up(self, a: str, b: str) -> bool:
        return a in self.clusters and b in self.clusters and frozenset((a, b)) not in self.cut

    def links_for(self, node_id: str) -> Any:
        net = self

        class Links:
            def send(self, peer_id: str, message: Any) -> bool:
                if not net.up(node_id, peer_id):
                    return False
                net.channels[(node_id, peer_id)].send_nowait(message)
                return True

        return Links()

    def join(self, cluster: Cluster, inbox: PeerMessages) -> None:
        self.clusters[cluster.node_id] = cluster
        self.inboxes[cluster.node_id] = inbox
        for other in list(self.clusters):
            if other == cluster.node_id:
                continue
            for a, b in ((cluster.node_id, other), (other, cluster.node_id)):
                send, receive = trio.open_memory_channel[ClusterMessage](math.inf)
                self.channels[(a, b)] = send
                self.nursery.start_soon(self._pump, a, b, receive)
            self.clusters[other].on_peer_up(cluster.node_id)
            cluster.on_peer_up(other)

    async def _pump(self, a: str, b: str, receive: trio.MemoryReceiveChannel[Any]) -> None:
        async for message in receive:
            await trio.sleep(0.001)  # a little latency
            if self.up(a, b):
                self.inboxes[b].receive(a, message)

    def sever(self, a: str, b: str) -> None:
        self.cut.add(frozenset((a, b)))
        self.clusters[a].on_peer_down(b, "cut")
        self.clusters[b].on_peer_down(a, "cut")

    def kill(self, node_id: str) -> None:
        for other in self.clusters:
            if other != node_id:
                self.clusters[other].on_peer_down(node_id, "killed")
        del self.clusters[node_id]
        del self.inboxes[node_id]


class Member:
    """One node: registry, relay, shards with fake runners, cluster, Node."""

    def __init__(self, net: Net, node_id: str, *, auto: bool, expected_peers: int) -> None:
        self.runners: list[FakeRunner] = []
        parts = cluster_parts(
            node_id,
            net.links_for(node_id),
            self._launcher,
            host="127.0.0.1",
            models={"m": MODEL},
            serve=("m",),
            free_ports=lambda: (5000, 5001, 5002),
            settings=ClusterSettings(
                auto_place=auto, expected_peers=expected_peers, peer_grace=1.0, settle=5.0
            ),
        )
        self.registry, self.shards, self.router = parts.registry, parts.shards, parts.router
        self.cluster, self.messages = parts.cluster, parts.messages
        self.node = Node(
            model=ModelCard(id="m", context_length=4096, created=0),
            encoder=None,  # type: ignore[arg-type]
            registry=self.registry,
            seams=Seams(),
            dispatcher=self.router,
        )
        self.scope = trio.CancelScope()

    def _launcher(self, spec: InstanceSpec, rank: int) -> Any:
        async def launch() -> FakeConn:
            ours, theirs = trio.testing.memory_stream_pair()
            runner = FakeRunner(theirs, model=spec.model, step_delay=lambda: 0.01)
            self.runners.append(runner)
            assert self.nursery is not None
            self.nursery.start_soon(runner.run)
            return FakeConn(ours)

        return launch

    async def run(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        with self.scope:
            async with trio.open_nursery() as inner:
                self.nursery = inner
                await inner.start(self.shards.run)
                await inner.start(self.cluster.run)


async def start_members(
    nursery: trio.Nursery, names: list[str], *, auto: bool = False
) -> tuple[Net, dict[str, Member]]:
    net = Net(nursery)
    members = {}
    for name in names:
        member = Member(net, name, auto=auto, expected_peers=len(names) - 1)
        members[name] = member
        nursery.start_soon(member.run, nursery)
    await trio.lowlevel.checkpoint()
    for member in members.values():
        net.join(member.cluster, member.messages)
    return net, members


async def wait_for(predicate: Any, limit: float = 30.0) -> None:
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.05)


def command(rid: str, n: int = 20) -> TextGeneration:
    return TextGeneration(
        request_id=rid, model="m", prompt_tokens=[1, 2], params=SamplingParams(max_tokens=n)
    )


async def collect(member: Member, rid: str, n: int = 20) -> list[GenerationEvent]:
    with member.node.open_generation(command(rid, n)) as stream:
        return [event async for event in stream]


def ready(member: Member) -> bool:
    return member.router.ready("m")


async def place(member: Member, nodes: list[str], sharding: str = "pipeline") -> InstanceSpec:
    reply = await member.cluster.place(
        PlaceRequest(call_id="c", model="m", sharding=sharding, nodes=tuple(nodes))  # type: ignore[arg-type]
    )
    assert reply.ok, reply.message
    assert reply.instance is not None
    return reply.instance


def iter_chunks(events: list[GenerationEvent]) -> Iterator[int]:
    return (e.seq for e in events if isinstance(e, ChunkGenerated))


async def test_the_smallest_id_leads_and_auto_placement_spans_all_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        _net, members = await start_members(nursery, ["b", "a", "c"], auto=True)
        await wait_for(lambda: all(ready(m) for m in members.values()))
        assert {m.cluster.leader for m in members.values()} == {"a"}
        (instance,) = members["c"].cluster.view.instances  # type: ignore[union-attr]
        assert sorted(s.node_id for s in instance.spec.shards) == ["a", "b", "c"]
        assert [(s.start_layer, s.end_layer) for s in instance.spec.shards] == [
            (0, 2),
            (2, 3),
            (3, 4),
        ]
        nursery.cancel_scope.cancel()


async def test_requests_route_through_a_node_without_a_shard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        _net, members = await start_members(nursery, ["a", "b", "c"])
        await wait_for(
            lambda: members["a"].cluster.leader == "a" and len(members["a"].cluster.reports) == 3
        )
        spec = await place(members["c"], ["a", "b"])  # c asks; a (the leader) places
        assert spec.entry_node == "a"
        await wait_for(lambda: ready(members["c"]))
        results = []

        async def one(i: int) -> None:
            results.append(await collect(members["c"], f"r{i}"))

        async with trio.open_nursery() as inner:
            for i in range(4):
                inner.start_soon(one, i)
        for events in results:
            assert list(iter_chunks(events)) == list(range(20))
            assert isinstance(events[-1], GenerationFinished)
        assert not members["c"].router.statistics().relay.routes
        # The last acknowledgement is on its way; then the entry node holds nothing.
        await wait_for(lambda: not members["a"].router.statistics().relay.outgoing)
        nursery.cancel_scope.cancel()


async def test_cancel_by_id_reaches_the_owner_through_any_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cancel that reaches a node without the request asks its peers: the owner
    cancels it ("cancelled"); an id nobody has is "absent" once every peer said
    no; with a peer cut off the answer is "unknown", not a false "absent"."""
    async with trio.open_nursery() as nursery:
        net, members = await start_members(nursery, ["a", "b", "c"])
        await wait_for(
            lambda: members["a"].cluster.leader == "a" and len(members["a"].cluster.reports) == 3
        )
        await place(members["a"], ["a", "b"])
        await wait_for(lambda: ready(members["c"]))
        outcomes = []

        async def cancel_through_a_after_3_chunks(events: list[GenerationEvent]) -> None:
            await wait_for(lambda: len(events) >= 3)
            outcomes.append(await members["a"].node.cancel_anywhere("r"))

        events: list[GenerationEvent] = []
        with members["c"].node.open_generation(command("r", 1000)) as stream:
            nursery.start_soon(cancel_through_a_after_3_chunks, events)
            async for event in stream:
                events.append(event)
        await wait_for(lambda: outcomes)  # the owner's answer is on its way back
        assert outcomes == ["cancelled"]
        assert isinstance(events[-1], GenerationFailed) and events[-1].kind == "cancelled"
        assert len(events) < 100
        assert await members["b"].node.cancel_anywhere("nobody") == "absent"
        net.sever("b", "c")
        assert await members["b"].node.cancel_anywhere("nobody") == "unknown"
        nursery.cancel_scope.cancel()


async def test_a_lost_entry_node_fails_requests_and_the_model_is_placed_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net, members = await start_members(nursery, ["a", "b", "c"], auto=True)
        await wait_for(lambda: all(ready(m) for m in members.values()))
        got: list[GenerationEvent] = []

        async def stream() -> None:
            with members["c"].node.open_generation(command("x", 10_000)) as s:
                async for event in s:
                    got.append(event)
                    if len(got) == 5:
                        # The entry node (a, rank 0) dies mid-stream.
                        net.kill("a")
                        members["a"].scope.cancel()

        with trio.fail_after(10):
            await stream()
        assert isinstance(got[-1], GenerationFailed) and got[-1].kind == "peer_lost"
        assert list(iter_chunks(got)) == list(range(len(got) - 1))
        # b leads now, in a newer term, and places the model on what is left.
        await wait_for(lambda: members["b"].cluster.leader == "b" and ready(members["c"]))
        assert members["b"].cluster.term > members["a"].cluster.term
        (spec,) = [s.spec for s in members["c"].cluster.view.instances if s.state == "ready"]  # type: ignore[union-attr]
        assert sorted(s.node_id for s in spec.shards) == ["b", "c"]
        events = await collect(members["c"], "after")
        assert isinstance(events[-1], GenerationFinished)
        nursery.cancel_scope.cancel()


async def test_a_stale_leader_cannot_start_shards(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        net, members = await start_members(nursery, ["a", "b"])
        await wait_for(lambda: members["b"].cluster.term >= 1)
        net.sever("a", "b")  # b now leads itself, in a newer term
        await wait_for(lambda: members["b"].cluster.leader == "b")
        await trio.sleep(1)
        spec = InstanceSpec(
            instance_id="stale",
            model="m",
            sharding="pipeline",
            backend="ring",
            shards=(),
            auto=False,
        )
        members["b"].messages.receive("a", StartShard(term=1, instance=spec, rank=0))
        assert "stale" not in members["b"].shards.shards
        nursery.cancel_scope.cancel()


class Mailbox:
    """Links for clusters driven by hand: messages wait in `queue` until
    `deliver` hands them over, and only between linked pairs."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.inboxes: dict[str, PeerMessages] = {}
        self.pairs = {frozenset(p) for p in pairs}
        self.queue: list[tuple[str, str, Any]] = []
        self.seen: list[tuple[str, str, Any]] = []

    def links_for(self, node_id: str) -> Any:
        box = self

        class Links:
            def send(self, peer_id: str, message: Any) -> bool:
                if frozenset((node_id, peer_id)) not in box.pairs:
                    return False
                box.queue.append((node_id, peer_id, message))
                return True

        return Links()

    def deliver(self) -> None:
        while self.queue:
            source, target, message = self.queue.pop(0)
            self.seen.append((source, target, message))
            self.inboxes[target].receive(source, message)


def lone(node_id: str, box: Mailbox, **disk: Any) -> Cluster:
    """A cluster linked through `box`, serving nothing, with no runner."""
    parts = cluster_parts(node_id, box.links_for(node_id), models={"m": MODEL}, serve=(), **disk)
    box.inboxes[node_id] = parts.messages
    return parts.cluster


def test_a_term_is_granted_to_one_leader_and_a_refused_leader_asks_above_it() -> None:
    """a and b cannot reach each other, c reaches both: both lead, and both ask c
    for term 1. c grants it to a only; b, refused, asks for term 2 and leads in it.
    No node ever hears two leaders in one term."""
    assert decide.may_grant(0, None, 1, "a")
    assert not decide.may_grant(1, decide.Vote(1, "a"), 1, "b")
    assert decide.may_grant(1, decide.Vote(1, "a"), 1, "a")  # asked again: same answer
    assert decide.may_grant(1, decide.Vote(1, "a"), 2, "b")

    async def main() -> None:
        box = Mailbox(("a", "c"), ("b", "c"))
        a, b, c = lone("a", box), lone("b", box), lone("c", box)
        clusters = {"a": a, "b": b, "c": c}
        for node, peer in (("a", "c"), ("b", "c"), ("c", "a"), ("c", "b")):
            clusters[node].on_peer_up(peer)
        a._tick()  # a and b both lead, and both ask c for term 1
        b._tick()
        box.deliver()
        assert c.vote == decide.Vote(1, "a") and a._confirmed() and not b._confirmed()
        b._tick()  # refused: b asks above the term c knows
        box.deliver()
        assert c.vote == decide.Vote(2, "b") and b._confirmed() and b.lead_term == 2
        # b leads in term 2: with c's report in, its view reaches c, which takes it.
        box.inboxes["b"].receive("c", c.report())
        b._tick()
        box.deliver()
        assert c.view is not None and (c.view.leader, c.view.term) == ("b", 2)
        # a's commands of term 1 are refused at c now...
        stale = InstanceSpec(
            instance_id="stale",
            model="m",
            sharding="pipeline",
            backend="ring",
            shards=(),
            auto=False,
        )
        box.inboxes["c"].receive("a", StartShard(term=1, instance=stale, rank=0))
        assert "stale" not in c.shards.shards
        # ...and c's report (to a, its own choice of leader) makes a ask for term 3.
        c._tick()
        box.deliver()
        a._tick()
        box.deliver()
        assert c.vote == decide.Vote(3, "a") and a._confirmed() and a.lead_term == 3
        leaders: dict[int, set[str]] = {}
        for source, _target, message in box.seen:
            if isinstance(message, ClusterView | StartShard | StopShard):
                leaders.setdefault(message.term, set()).add(source)
        assert all(len(names) == 1 for names in leaders.values()), leaders

    trio.run(main, clock=trio.testing.MockClock())


def test_a_restarted_node_does_not_grant_a_term_it_granted_in_its_previous_life(
    tmp_path: Path,
) -> None:
    """c grants term 1 to a and writes the grant down (the daemon's vote.json); c
    restarts, and b, asking for term 1, is refused: it leads in term 2."""

    async def main() -> None:
        first = Mailbox(("a", "c"))
        a = lone("a", first)
        c = lone("c", first, remember_vote=lambda vote: save_vote(tmp_path, vote))
        a.on_peer_up("c")
        c.on_peer_up("a")
        a._tick()
        first.deliver()
        assert c.vote == decide.Vote(1, "a") == load_vote(tmp_path)
        # c's new life, linked to b only.
        second = Mailbox(("b", "c"))
        b = lone("b", second)
        c = lone("c", second, remembered_vote=load_vote(tmp_path))
        b.on_peer_up("c")
        c.on_peer_up("b")
        assert c.term == 1
        b._tick()  # b asks c for term 1 ...
        second.deliver()
        assert c.vote == decide.Vote(1, "a") and not b._confirmed()
        b._tick()  # ... is refused, and asks above it
        second.deliver()
        assert c.vote == decide.Vote(2, "b") and b._confirmed()

    trio.run(main, clock=trio.testing.MockClock())
