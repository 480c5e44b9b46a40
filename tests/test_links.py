"""PeerLinks: authenticated node-to-node links over trio-websocket.

Most tests run real loopback TCP with short heartbeat settings; the last group runs
the same code over in-memory streams under MockClock, as the simulator does.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
import trio_websocket

from exo_trio.net import auth, wire
from exo_trio.net.links import CallbackError, InsecureAddressError, PeerInfo, PeerLinks

SECRET = b"correct horse battery staple"
LOOP = "127.0.0.1"
FAST = {
    "heartbeat_interval": 0.1,
    "dead_after": 0.8,
    "reconnect_min": 0.05,
    "reconnect_max": 0.3,
    "handshake_timeout": 2.0,
}


class Msg(msgspec.Struct):
    seq: int
    text: str = ""


class Node:
    """One PeerLinks plus a record of every callback it made."""

    def __init__(
        self,
        node_id: str,
        *,
        secret: bytes | None = SECRET,
        peers: list[tuple[str, int]] | None = None,
        port: int = 0,
        message_type: Any = Msg,
        cluster: str = "test-cluster",
        **options: Any,
    ) -> None:
        self.node_id = node_id
        self.received: dict[str, list[Any]] = {}
        self.ups: list[PeerInfo] = []
        self.downs: list[tuple[str, str]] = []
        settings = {**FAST, **options}
        self.links: PeerLinks[Any] = PeerLinks(
            node_id,
            cluster,
            secret,
            message_type,
            on_message=lambda peer, msg: self.received.setdefault(peer, []).append(msg),
            on_peer_up=self.ups.append,
            on_peer_down=lambda peer, reason: self.downs.append((peer, reason)),
            listen_host=LOOP,
            listen_port=port,
            peers=peers or [],
            **settings,
        )
        self.scope: trio.CancelScope | None = None
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> Node:
        self.port = await nursery.start(self._run)
        return self

    async def _run(self, *, task_status: trio.TaskStatus[int]) -> None:
        with trio.CancelScope() as self.scope:
            await self.links.run(task_status=task_status)

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()

    @property
    def address(self) -> tuple[str, int]:
        return (LOOP, self.port)

    def linked(self, *others: Node) -> bool:
        return all(o.node_id in self.links.peers() for o in others)


async def eventually(predicate: Callable[[], bool], limit: float = 20.0) -> None:
    # Generous: real sockets on a shared 2-core machine (reconnects back off, too).
    # A hang still fails; exact timing bounds are checked under MockClock.
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.01)


def seqs(node: Node, peer: str) -> list[int]:
    return [m.seq for m in node.received.get(peer, [])]


class TamperStream(trio.abc.Stream):
    """Flips the last byte of the next write once armed: inside a websocket frame's
    payload, so only the link's MAC can notice."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.armed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.armed:
            self.armed = False
            data = bytes(data[:-1]) + bytes([data[-1] ^ 0x01])
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class PausableStream(TamperStream):
    """Goes silent when paused, like a stopped process whose socket stays open."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.resumed = trio.Event()
        self.resumed.set()

    def pause(self) -> None:
        self.resumed = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.resumed.wait()
        await super().send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        await self.resumed.wait()
        return data


class FrozenStream(PausableStream):
    """A paused stream that cannot even be closed: a frozen process's socket, which
    the kernel keeps open, so the other side sees neither data nor EOF."""

    async def aclose(self) -> None:
        await self.resumed.wait()
        await super().aclose()


def recording_connector(cls: type[TamperStream], made: list[Any]) -> Any:
    async def connect(host: str, port: int) -> trio.abc.Stream:
        stream = cls(await trio.open_tcp_stream(host, port))
        made.append(stream)
        return stream

    return connect


# --- real loopback TCP --------------------------------------------------------------


async def test_two_nodes_exchange_messages_in_order_both_ways(nursery: trio.Nursery) -> None:
    a = await Node("a").start(nursery)
    b = await Node("b", peers=[a.address]).start(nursery)
    await eventually(lambda: a.linked(b) and b.linked(a))

    for i in range(300):
        assert b.links.send("a", Msg(i, "from b"))
        assert a.links.send("b", Msg(i, "from a"))
    await eventually(lambda: len(seqs(a, "b")) == 300 and len(seqs(b, "a")) == 300)
    assert seqs(a, "b") == list(range(300)) and seqs(b, "a") == list(range(300))
    assert {m.text for m in a.received["b"]} == {"from b"}

    info_at_b = b.links.peers()["a"]
    assert info_at_b.outbound and info_at_b.link_address == a.address
    assert (LOOP, a.port) in {(x.host, x.port) for x in info_at_b.addresses}
    assert info_at_b.incarnation == a.links.incarnation
    info_at_a = a.links.peers()["b"]
    assert not info_at_a.outbound and info_at_a.link_address is not None
    assert [p.node_id for p in a.ups] == ["b"] and [p.node_id for p in b.ups] == ["a"]
    assert not a.downs and not b.downs
    assert a.links.send("nobody", Msg(0)) is False


async def test_three_nodes_form_a_mesh(nursery: trio.Nursery) -> None:
    a = await Node("a").start(nursery)
    b = await Node("b", peers=[a.address]).start(nursery)
    c = await Node("c", peers=[a.address, b.address]).start(nursery)
    nodes = [a, b, c]
    await eventually(lambda: a.linked(b, c) and b.linked(a, c) and c.linked(a, b))
    for sender in nodes:
        for receiver in nodes:
            if sender is not receiver:
                for i in range(50):
                    assert sender.links.send(receiver.node_id, Msg(i))
    await eventually(
        lambda: all(
            seqs(r, s.node_id) == list(range(50)) for s in nodes for r in nodes if s is not r
        )
    )
    assert all(len(n.ups) == 2 and not n.downs for n in nodes)


@pytest.mark.parametrize(
    ("secret_a", "secret_b"),
    [(SECRET, b"a different cluster secret"), (SECRET, None), (None, SECRET)],
    ids=["wrong-secret", "dialer-has-no-secret", "acceptor-has-no-secret"],
)
async def test_mismatched_secret_is_refused(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    secret_a: bytes | None,
    secret_b: bytes | None,
) -> None:
    caplog.set_level(logging.INFO, logger="exo_trio.net")
    a = await Node("a", secret=secret_a).start(nursery)
    b = await Node("b", secret=secret_b, peers=[a.address]).start(nursery)
    await eventually(lambda: a.links.stats["auth_failures"] + b.links.stats["auth_failures"] > 0)
    await trio.sleep(0.3)  # a retry or two more; none may succeed
    assert not a.ups and not b.ups and not a.links.peers() and not b.links.peers()
    assert not a.links.send("b", Msg(1)) and not b.links.send("a", Msg(1))
    text = caplog.text
    # The side that found the bad proof says so, the other side hears why it was closed.
    assert "authentication failed: the peer's proof does not match our cluster secret" in text
    assert "peer refused the link: authentication failed" in text


async def test_tampered_frame_closes_the_link(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    streams: list[TamperStream] = []
    a = await Node("a").start(nursery)
    b = await Node(
        "b", peers=[a.address], connector=recording_connector(TamperStream, streams)
    ).start(nursery)
    await eventually(lambda: a.linked(b) and b.linked(a))
    b.links.send("a", Msg(1))
    await eventually(lambda: seqs(a, "b") == [1])

    streams[-1].armed = True
    b.links.send("a", Msg(2, "tampered in transit"))
    await eventually(lambda: bool(a.downs) and bool(b.downs))
    assert a.downs[0][0] == "b" and "bad MAC" in a.downs[0][1]
    assert "bad MAC" in b.downs[0][1]  # b hears why a closed the link
    assert a.links.stats["mac_failures"] == 1
    assert "bad MAC on frame" in caplog.text and "tampered" in caplog.text
    assert seqs(a, "b") == [1]  # the tampered message was never delivered

    # The dialer reconnects; the new link works.
    await eventually(lambda: a.linked(b) and b.linked(a))
    b.links.send("a", Msg(3))
    await eventually(lambda: seqs(a, "b") == [1, 3])


async def test_silent_peer_is_reported_down_within_dead_after(nursery: trio.Nursery) -> None:
    streams: list[PausableStream] = []
    a = await Node("a").start(nursery)
    b = await Node(
        "b", peers=[a.address], connector=recording_connector(PausableStream, streams)
    ).start(nursery)
    await eventually(lambda: a.linked(b))
    await trio.sleep(1.0)  # longer than dead_after: heartbeats keep an idle link up
    assert not a.downs

    paused_at = trio.current_time()
    streams[-1].pause()
    await eventually(lambda: bool(a.downs), limit=3.0)
    took = trio.current_time() - paused_at
    assert a.downs[0][0] == "b" and "heartbeat timeout" in a.downs[0][1]
    assert FAST["dead_after"] - 0.15 <= took <= FAST["dead_after"] + 1.5
    assert len(a.downs) == 1
    # b timed out on its side too and dials again on a fresh connection.
    await eventually(lambda: a.linked(b) and b.linked(a))
    assert len(a.downs) == 1 and len(a.ups) == 2


_CHILD = textwrap.dedent("""
    import sys, msgspec, trio
    from exo_trio.net.links import PeerLinks
    class Msg(msgspec.Struct):
        seq: int
        text: str = ""
    links = PeerLinks("child", "test-cluster", sys.argv[1].encode(), Msg,
                      lambda p, m: None, lambda i: None, lambda p, r: None,
                      listen_host="127.0.0.1", peers=[("127.0.0.1", int(sys.argv[2]))],
                      heartbeat_interval=0.1, dead_after=0.8)
    trio.run(links.run)
""")


async def test_stopped_process_is_reported_down(nursery: trio.Nursery) -> None:
    """A real peer process frozen with SIGSTOP: its sockets stay open, it goes quiet."""
    a = await Node("a").start(nursery)
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CHILD, SECRET.decode(), str(a.port)]
    )
    try:
        await eventually(lambda: "child" in a.links.peers(), limit=15.0)
        await trio.sleep(0.5)
        assert not a.downs
        child.send_signal(signal.SIGSTOP)
        stopped_at = trio.current_time()
        await eventually(lambda: bool(a.downs), limit=5.0)
        # Generous margin: the test machine's cores are shared. MockClock tests below
        # check the bound exactly.
        assert trio.current_time() - stopped_at <= FAST["dead_after"] + 1.5
        assert "heartbeat timeout" in a.downs[0][1]
        child.send_signal(signal.SIGCONT)
        # Once it runs again it notices the dead link and dials back in.
        await eventually(lambda: "child" in a.links.peers(), limit=5.0)
    finally:
        child.kill()
        await child.wait()


async def test_restarted_peer_is_reconnected(nursery: trio.Nursery) -> None:
    a = await Node("a").start(nursery)
    b = await Node("b", peers=[a.address]).start(nursery)
    await eventually(lambda: a.linked(b) and b.linked(a))
    first_incarnation = b.links.peers()["a"].incarnation

    a.stop()  # a goes away; b keeps dialing its address
    await eventually(lambda: bool(b.downs))
    await trio.sleep(0.3)
    a2 = await Node("a", port=a.port).start(nursery)
    await eventually(lambda: a2.linked(b) and b.linked(a2))
    assert b.links.peers()["a"].incarnation != first_incarnation
    b.links.send("a", Msg(7))
    await eventually(lambda: seqs(a2, "b") == [7])
    assert len(b.ups) == 2 and len(b.downs) == 1


async def test_simultaneous_dials_end_in_one_link(nursery: trio.Nursery) -> None:
    duplicates = 0
    for round_ in range(3):
        async with trio.open_nursery() as inner:
            # Two nodes that know each other's (pre-bound) ports and start together.
            ports = []
            for _ in range(2):
                sock = trio.socket.socket()
                await sock.bind((LOOP, 0))
                ports.append(sock.getsockname()[1])
                sock.close()
            a = Node(f"a{round_}", port=ports[0], peers=[(LOOP, ports[1])])
            b = Node(f"b{round_}", port=ports[1], peers=[(LOOP, ports[0])])
            inner.start_soon(a.start, inner)
            inner.start_soon(b.start, inner)
            await eventually(lambda: a.linked(b) and b.linked(a))  # noqa: B023
            await trio.sleep(0.5)  # any duplicate has been resolved by now
            assert len(a.ups) == 1 and len(b.ups) == 1
            assert not a.downs and not b.downs
            # Both sides agree on which link survived.
            assert a.ups[0].outbound != b.ups[0].outbound
            duplicates += a.links.stats["duplicates_refused"] + b.links.stats["duplicates_refused"]
            a.links.send(b.node_id, Msg(1))
            b.links.send(a.node_id, Msg(2))
            await eventually(lambda: seqs(b, a.node_id) == [1] and seqs(a, b.node_id) == [2])  # noqa: B023
            inner.cancel_scope.cancel()
    assert duplicates >= 1  # the race really happened (and was resolved)


async def test_other_cluster_and_own_address_are_not_linked(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exo_trio.net")
    a = await Node("a").start(nursery)
    await Node("b", cluster="other-cluster", peers=[a.address]).start(nursery)
    assert a.links.add_peer_address(*a.address)  # e.g. discovery hearing our own beacon
    await eventually(
        lambda: (
            "cluster id mismatch" in caplog.text and "own listener; not dialing it" in caplog.text
        )
    )
    await trio.sleep(0.2)
    assert not a.ups and not a.links.peers()


def test_without_secret_non_loopback_is_refused() -> None:
    def make(**kw: Any) -> PeerLinks[Msg]:
        return PeerLinks(
            "a", "c", None, Msg, lambda p, m: None, lambda i: None, lambda p, r: None, **kw
        )

    with pytest.raises(InsecureAddressError, match="loopback-only"):
        make(listen_host="0.0.0.0")
    with pytest.raises(InsecureAddressError, match="without a cluster secret"):
        make(listen_host=LOOP, peers=[("192.0.2.7", 5000)])
    with pytest.raises(InsecureAddressError):
        make(listen_host="my-host.local")  # names are not resolved: refused
    with pytest.raises(ValueError, match="empty"):
        PeerLinks("a", "c", b"", Msg, lambda p, m: None, lambda i: None, lambda p, r: None)
    links = make()  # the default without a secret is loopback
    assert links._listen_host == LOOP
    assert links.add_peer_address("192.0.2.7", 5000) is False
    assert links.add_peer_address("::1", 5000) is True


async def test_secretless_nodes_link_over_loopback(nursery: trio.Nursery) -> None:
    a = await Node("a", secret=None).start(nursery)
    b = await Node("b", secret=None, peers=[a.address]).start(nursery)
    await eventually(lambda: a.linked(b) and b.linked(a))
    a.links.send("b", Msg(5))
    await eventually(lambda: seqs(b, "a") == [5])


async def test_oversize_and_undecodable_messages_close_only_that_link(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exo_trio.net")

    class Other(msgspec.Struct):
        name: str

    a = await Node("a", max_message_bytes=2000).start(nursery)
    b = await Node("b", peers=[a.address]).start(nursery)
    c = await Node("c", peers=[a.address], message_type=Other).start(nursery)
    await eventually(lambda: a.linked(b, c))

    with pytest.raises(ValueError, match="exceeds"):
        a.links.send("b", Msg(0, "x" * 5000))  # our own cap: the caller's bug
    b.links.send("a", Msg(1, "x" * 5000))  # within b's cap, over a's
    await eventually(lambda: any(p == "b" for p, _ in a.downs))
    assert "message over the" in dict(a.downs)["b"]

    c.links.send("a", Other("not a Msg"))
    await eventually(lambda: any(p == "c" for p, _ in a.downs))
    assert "undecodable message" in dict(a.downs)["c"]
    assert "undecodable message" in caplog.text

    # a is fine: b's next (small) message arrives on its new link (once b has it
    # too: the decider, a, keeps the link a moment before b hears so).
    await eventually(lambda: a.linked(b) and b.linked(a))
    assert b.links.send("a", Msg(2))
    await eventually(lambda: seqs(a, "b") == [2])


async def test_garbage_connections_do_not_hurt_the_node(nursery: trio.Nursery) -> None:
    a = await Node("a", handshake_timeout=0.5).start(nursery)
    junk = [
        b"\x00\x01garbage that is not http\r\n\r\n",
        b"GET /not-a-link HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"",  # connect and say nothing: the handshake timeout ends it
    ]
    streams = []
    for data in junk:
        stream = await trio.open_tcp_stream(LOOP, a.port)
        if data:
            await stream.send_all(data)
        streams.append(stream)
    await trio.sleep(0.7)
    for stream in streams:
        await stream.aclose()
    b = await Node("b", peers=[a.address]).start(nursery)
    await eventually(lambda: a.linked(b))
    assert a.links._pending_inbound == 0


async def test_unauthenticated_flood_is_cut_off(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that has not proved the secret may not make us buffer a big message."""
    caplog.set_level(logging.INFO, logger="exo_trio.net")
    a = await Node("a").start(nursery)
    with trio.fail_after(5):
        async with trio_websocket.open_websocket(
            LOOP, a.port, wire.LINK_RESOURCE, use_ssl=False
        ) as ws:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(b"\x00" * (1024 * 1024))
                await ws.get_message()
    await eventually(lambda: "bytes before authentication" in caplog.text)
    await eventually(lambda: a.links._pending_inbound == 0)
    assert not a.ups


async def test_callback_errors_escape_run() -> None:
    def explode(info: PeerInfo) -> None:
        raise RuntimeError("caller bug")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            a = await Node("a").start(nursery)
            a.links._on_peer_up = explode
            await Node("b", peers=[a.address]).start(nursery)
            await trio.sleep(5)
    assert caught.group_contains(CallbackError)


def test_frames_are_encrypted_and_reject_replay_reorder_and_the_wrong_direction() -> None:
    digest = auth.transcript(b"hello-d", b"hello-a")
    key = auth.link_key(SECRET)
    dialer, acceptor = auth.Ephemeral(bytes([1]) * 32), auth.Ephemeral(bytes([2]) * 32)
    shared = dialer.exchange(acceptor.public)
    assert shared is not None and shared == acceptor.exchange(dialer.public)
    master = auth.master_key(key, shared, digest)
    d_send, _ = auth.session_ciphers(master, dialer=True)
    a_send, a_recv = auth.session_ciphers(master, dialer=False)
    secret_text = b"the prompt and the tokens of a request"
    sealed = [d_send.seal(wire.KIND_MESSAGE, secret_text + b"%d" % i) for i in range(3)]
    assert all(secret_text not in s for s in sealed)  # nobody on the wire reads it
    assert a_recv.open(wire.KIND_MESSAGE, sealed[0]) == secret_text + b"0"
    assert a_recv.open(wire.KIND_MESSAGE, sealed[0]) is None  # replay
    assert a_recv.open(wire.KIND_MESSAGE, sealed[2]) is None  # reorder (skips 1)
    assert a_recv.open(wire.KIND_HEARTBEAT, sealed[1]) is None  # the kind is covered
    flipped = bytes([sealed[1][0] ^ 1]) + sealed[1][1:]
    assert a_recv.open(wire.KIND_MESSAGE, flipped) is None  # tampered
    assert a_recv.open(wire.KIND_MESSAGE, sealed[1]) == secret_text + b"1"
    reflected = a_send.seal(wire.KIND_MESSAGE, b"x")
    assert a_recv.open(wire.KIND_MESSAGE, reflected) is None  # own frames bounce
    assert auth.verify_proof(master, "dialer", auth.proof(master, "dialer"))
    assert not auth.verify_proof(master, "acceptor", auth.proof(master, "dialer"))
    other = auth.master_key(auth.link_key(b"another cluster secret"), shared, digest)
    assert not auth.verify_proof(other, "dialer", auth.proof(master, "dialer"))
    # A low-order public key (all zeros) would make the exchange worthless: refused.
    assert dialer.exchange(bytes(32)) is None


# --- in-memory streams under MockClock: the simulator's seams -------------------------


class MemoryNetwork:
    """Listener and connector over trio.testing memory streams: no sockets at all."""

    def __init__(self) -> None:
        # Keyed by port alone: every simulated host shares one port space here.
        self.listeners: dict[int, trio.MemorySendChannel[trio.abc.Stream]] = {}
        self.client_streams: list[FrozenStream] = []

    async def listen(self, host: str, port: int) -> list[MemoryListener]:
        send, receive = trio.open_memory_channel[trio.abc.Stream](16)
        self.listeners[port] = send
        return [MemoryListener(receive)]

    def unlisten(self, port: int) -> None:
        self.listeners.pop(port).close()

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        await trio.sleep(0.001)  # some latency, in virtual time
        channel = self.listeners.get(port)
        if channel is None:
            raise ConnectionRefusedError(f"nothing listens on {host}:{port}")
        client, server = trio.testing.memory_stream_pair()
        try:
            channel.send_nowait(server)
        except trio.ClosedResourceError:
            raise ConnectionRefusedError(f"{host}:{port} went away") from None
        stream = FrozenStream(client)
        self.client_streams.append(stream)
        return stream


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, receive: trio.MemoryReceiveChannel[trio.abc.Stream]) -> None:
        self._receive = receive

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            await trio.sleep_forever()
            raise AssertionError("unreachable") from None

    async def aclose(self) -> None:
        await self._receive.aclose()


def memory_node(
    net: MemoryNetwork, node_id: str, port: int, peers: list[tuple[str, int]], seed: int
) -> Node:
    rng = random.Random(seed)
    return Node(
        node_id,
        peers=peers,
        port=port,
        heartbeat_interval=0.5,
        dead_after=3.0,
        reconnect_min=0.1,
        reconnect_max=5.0,
        connector=net.connect,
        listener=net.listen,
        # Deterministic randomness, as the simulator injects it.
        token_bytes=rng.randbytes,
        rng=rng,
        advertise=[wire.AdvertisedAddress(f"sim-{node_id}", port, "sim0", "private")],
    )


async def test_links_run_on_memory_streams_under_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a = await memory_node(net, "a", 1, [], seed=1).start(nursery)
        b = await memory_node(net, "b", 2, [("sim-a", 1)], seed=2).start(nursery)
        assert a.port == 1
        await eventually(lambda: a.linked(b) and b.linked(a))
        assert b.links.peers()["a"].addresses[0].host == "sim-a"
        for i in range(20):
            a.links.send("b", Msg(i))
        await eventually(lambda: seqs(b, "a") == list(range(20)))

        await trio.sleep(600)  # ten virtual minutes of heartbeats: nobody is declared dead
        assert not a.downs and not b.downs

        paused_at = trio.current_time()
        net.client_streams[-1].pause()
        await eventually(lambda: bool(a.downs) and bool(b.downs), limit=10)
        assert "heartbeat timeout" in a.downs[0][1]
        # Virtual time makes the bound exact: the last byte arrived at most one
        # heartbeat interval before the pause.
        assert 3.0 - 0.5 <= trio.current_time() - paused_at <= 3.0 + 0.01
        await eventually(lambda: a.linked(b) and b.linked(a), limit=30)
        nursery.cancel_scope.cancel()


async def test_restarted_peer_replaces_its_stale_link_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """b restarts while its old link still looks alive to a (silent, not closed): the
    new incarnation replaces the stale link without waiting for the heartbeat
    timeout, and a reports the old one down, then the new one up."""
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a = await memory_node(net, "a", 1, [], seed=1).start(nursery)
        b = await memory_node(net, "b", 2, [("sim-a", 1)], seed=2).start(nursery)
        await eventually(lambda: a.linked(b))
        old = a.links.peers()["b"].incarnation
        net.client_streams[-1].pause()  # the old process freezes, its socket stays
        b.stop()
        net.unlisten(2)
        restarted_at = trio.current_time()
        b2 = await memory_node(net, "b", 2, [("sim-a", 1)], seed=3).start(nursery)
        await eventually(lambda: a.linked(b2) and a.links.peers()["b"].incarnation != old)
        assert trio.current_time() - restarted_at < 1.0  # well under dead_after
        assert [d[1] for d in a.downs] == ["peer restarted"]
        assert a.ups[0].incarnation == old and len(a.ups) == 2
        nursery.cancel_scope.cancel()


async def test_memory_network_dedups_simultaneous_dials_for_many_seeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    duplicates = 0
    for seed in range(8):
        net = MemoryNetwork()
        async with trio.open_nursery() as nursery:
            nodes = [
                memory_node(net, name, port, [(f"sim-{o}", p) for o, p in others], seed * 10 + i)
                for i, (name, port, others) in enumerate(
                    [
                        ("a", 1, [("b", 2), ("c", 3)]),
                        ("b", 2, [("a", 1), ("c", 3)]),
                        ("c", 3, [("a", 1), ("b", 2)]),
                    ]
                )
            ]
            order = nodes[:]
            random.Random(seed).shuffle(order)
            for node in order:
                await node.start(nursery)

            def meshed(nodes: list[Node] = nodes) -> bool:
                return all(n.linked(*[o for o in nodes if o is not n]) for n in nodes)

            await eventually(meshed, limit=30)
            await trio.sleep(30)
            assert all(len(n.ups) == 2 and not n.downs for n in nodes), seed
            duplicates += sum(n.links.stats["duplicates_refused"] for n in nodes)
            nursery.cancel_scope.cancel()
    assert duplicates > 0


class SlowWrites(TamperStream):
    """Every write reaches the peer `delay` seconds late (one way's latency)."""

    def __init__(self, inner: trio.abc.Stream, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(self.delay)
        await super().send_all(data)


async def test_links_measure_their_round_trip_busy_or_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Heartbeat probes measure a link's round trip on both sides, on an idle link
    and on one busy enough never to send an idle heartbeat; a pong held for the next
    heartbeat does not count its wait."""
    net = MemoryNetwork()
    delay = 0.04  # b -> a only: the round trip is 40 ms either way round

    streams: list[SlowWrites] = []

    async def slow_connect(host: str, port: int) -> trio.abc.Stream:
        streams.append(SlowWrites(await net.connect(host, port), delay))
        return streams[-1]

    async with trio.open_nursery() as nursery:
        a = await memory_node(net, "a", 1, [], seed=1).start(nursery)
        b = memory_node(net, "b", 2, [("sim-a", 1)], seed=2)
        b.links._connector = slow_connect
        await b.start(nursery)
        await eventually(lambda: a.linked(b) and b.linked(a))
        assert a.links.rtt("b") is None  # nothing measured before the first probe
        await trio.sleep(5)  # idle: probes ride in the idle heartbeats
        for node, peer in ((a, "b"), (b, "a")):
            rtt = node.links.rtt(peer)
            assert rtt is not None and delay - 1e-6 <= rtt <= delay + 0.002, (node.node_id, rtt)

        delay = streams[-1].delay = 0.08  # the path slows down: measured again
        busy = trio.current_time() + 20
        sent = 0
        while trio.current_time() < busy:  # a message every 0.1 s: no idle heartbeat
            a.links.send("b", Msg(sent))
            b.links.send("a", Msg(sent))
            sent += 1
            await trio.sleep(0.1)
        for node, peer in ((a, "b"), (b, "a")):
            rtt = node.links.rtt(peer)
            assert rtt is not None and delay - 0.001 <= rtt <= delay + 0.002, (node.node_id, rtt)
        assert a.links.rtt("nobody") is None
        nursery.cancel_scope.cancel()


async def test_backlog_counts_a_message_until_its_frame_is_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A message handed straight to the idle writer leaves the outbox empty before
    the writer runs: the backlog still counts it until its frame is written (a
    drain waits on it before closing the links)."""
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a = await memory_node(net, "a", 1, [], seed=1).start(nursery)
        b = await memory_node(net, "b", 2, [("sim-a", 1)], seed=2).start(nursery)
        await eventually(lambda: a.linked(b) and b.linked(a))
        await trio.testing.wait_all_tasks_blocked()  # a's writer waits on its outbox
        assert a.links.send("b", Msg(1)) and a.links.send("b", Msg(2))
        assert a.links.backlog("b") == 2
        await eventually(lambda: seqs(b, "a") == [1, 2])
        assert a.links.backlog("b") == 0
        nursery.cancel_scope.cancel()
