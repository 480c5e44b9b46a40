"""The inter-node token relay: exact delivery across drops, duplicates, reconnects."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from exo_trio.cluster_messages import (
    ClusterMessage,
    RemoteCancel,
    RemoteEvents,
    RemoteGenerate,
    RemoteResume,
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
from exo_trio.worker import RunnerUnavailable


class Wire:
    """Two relays, owner "o" and entry "e", with a controllable link between them."""

    def __init__(self, buffer_limit: int = 4096, ack_every: int = 4) -> None:
        self.up = True
        self.drop_next = 0
        self.in_flight: list[tuple[str, str, ClusterMessage]] = []
        self.registry = StreamRegistry()
        self.entry_local: list[GenerationEvent] = []
        self.owner = TokenRelay("o", self._sender("o"), ack_every=ack_every)
        self.entry = TokenRelay("e", self._sender("e"), buffer_limit=buffer_limit)

    def route(self, event: GenerationEvent) -> None:
        """An event of the entry's runner, as its Router handles it."""
        if self.entry.relay_event(event) == "here":
            self.entry_local.append(event)

    def _sender(self, source: str) -> Callable[[str, ClusterMessage], bool]:
        def send(target: str, message: ClusterMessage) -> bool:
            if not self.up:
                return False
            if self.drop_next:
                self.drop_next -= 1
                return True  # accepted by the link, lost with it
            self.in_flight.append((source, target, message))
            return True

        return send

    def pump(self) -> None:
        while self.in_flight:
            source, target, message = self.in_flight.pop(0)
            relay = self.owner if target == "o" else self.entry
            if isinstance(message, RemoteGenerate):
                relay.accept(source, message)
            elif isinstance(message, RemoteEvents):
                for event in relay.on_events(source, message):
                    self.registry.deliver(event)
            elif isinstance(message, RemoteCancel):
                relay.on_cancel(source, message)
            else:
                handler = {"remote_ack": relay.on_ack, "remote_resume": relay.on_resume}
                handler[type(message).__struct_config__.tag](source, message)  # type: ignore[arg-type]


def command(rid: str, n: int) -> TextGeneration:
    return TextGeneration(
        request_id=rid, model="m", prompt_tokens=[1], params=SamplingParams(max_tokens=n)
    )


def chunk(rid: str, seq: int) -> ChunkGenerated:
    return ChunkGenerated(request_id=rid, seq=seq, token=seq, text=str(seq))


def finished(rid: str, n: int) -> GenerationFinished:
    return GenerationFinished(
        request_id=rid, chunks=n, finish_reason="length", prompt_tokens=1, completion_tokens=n
    )


def drain(registry: StreamRegistry, rid: str) -> list[GenerationEvent]:
    stream = registry._entries[rid].stream
    events = []
    while True:
        try:
            event = stream._receive.receive_nowait()
        except Exception:
            return events
        stream._check(event)
        events.append(event)


def start(wire: Wire, rid: str, n: int) -> None:
    wire.registry.open(rid, n)
    wire.owner.dispatch("e", "inst", command(rid, n))
    wire.pump()
    assert rid in wire.entry.outgoing


def test_events_flow_back_exactly_and_buffers_are_freed() -> None:
    wire = Wire()
    start(wire, "r", 10)
    for seq in range(10):
        wire.route(chunk("r", seq))
    wire.route(finished("r", 10))
    wire.pump()
    events = drain(wire.registry, "r")
    assert [e.seq for e in events[:-1]] == list(range(10))  # type: ignore[union-attr]
    assert isinstance(events[-1], GenerationFinished)
    assert not wire.entry.outgoing and not wire.owner.routes


def test_events_lost_with_a_link_are_resent_after_reconnect() -> None:
    wire = Wire()
    start(wire, "r", 8)
    wire.route(chunk("r", 0))
    wire.drop_next = 3  # the link dies with three events on it
    for seq in (1, 2, 3):
        wire.route(chunk("r", seq))
    wire.pump()
    wire.owner.on_peer_up("e")  # reconnected: ask for the rest
    wire.pump()
    for seq in range(4, 8):
        wire.route(chunk("r", seq))
    wire.route(finished("r", 8))
    wire.pump()
    events = drain(wire.registry, "r")
    assert [getattr(e, "seq", "end") for e in events] == [*range(8), "end"]
    assert wire.entry.statistics().resent == 3


def test_duplicates_are_dropped() -> None:
    wire = Wire(ack_every=100)
    start(wire, "r", 3)
    for seq in range(3):
        wire.route(chunk("r", seq))
    wire.pump()
    # A stale resume (e.g. one that crossed an ack) re-sends what already arrived.
    wire.entry.on_resume("o", RemoteResume(request_id="r", next_event=0))
    wire.pump()
    wire.route(finished("r", 3))
    wire.pump()
    assert len(drain(wire.registry, "r")) == 4
    assert wire.owner.statistics().duplicates == 3


def test_an_unreachable_entry_node_refuses_dispatch() -> None:
    wire = Wire()
    wire.up = False
    with pytest.raises(RunnerUnavailable):
        wire.owner.dispatch("e", "inst", command("r", 3))
    assert not wire.owner.routes


def test_a_lost_peer_fails_its_requests_explicitly() -> None:
    wire = Wire()
    start(wire, "r", 5)
    wire.route(chunk("r", 0))
    wire.pump()
    (failed,) = wire.owner.fail_routes("e", "node e lost")
    wire.registry.deliver(failed)
    events = drain(wire.registry, "r")
    assert isinstance(events[-1], GenerationFailed) and events[-1].kind == "peer_lost"
    assert wire.entry.drop_origin("o") == ["r"]


def test_cancel_stops_relaying_and_late_events_are_counted() -> None:
    wire = Wire()
    start(wire, "r", 5)
    wire.owner.cancel("r")
    wire.pump()
    assert "r" not in wire.entry.outgoing
    wire.route(chunk("r", 0))  # the runner was mid-step
    assert wire.entry.statistics().late == 1 and not wire.entry_local


def test_an_owner_that_stops_acking_gets_an_explicit_error() -> None:
    wire = Wire(buffer_limit=4, ack_every=1000)
    start(wire, "r", 10)
    for seq in range(5):
        wire.route(chunk("r", seq))
    wire.pump()
    events = drain(wire.registry, "r")
    assert [getattr(e, "seq", None) for e in events[:4]] == [0, 1, 2, 3]
    assert isinstance(events[4], GenerationFailed)


def test_local_requests_bypass_the_relay() -> None:
    wire = Wire()
    wire.route(chunk("local", 0))
    assert wire.entry_local == [chunk("local", 0)]
