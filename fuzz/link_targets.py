"""Fuzz targets for node-to-node links: the handshake, data frames, beacons.

link_handshake / link_frames: a real PeerLinks (exo_trio/net) on in-memory
streams under MockClock, and a hostile peer speaking real websocket (trio-websocket)
that plays a script decoded from the input. The script can send raw messages,
text messages, Hellos with fuzzed fields, correct or wrong proofs, data frames with
a correct MAC (so the fuzzer reaches the frame-kind and message decoding code
behind the MAC, with cluster messages as the payload type), replays, waits and
closes. The peer is either the dialer (our node accepts) or the acceptor (our node
dials). The property: whatever the script, the link ends with a clean protocol
error (no "failed unexpectedly", nothing escaping PeerLinks.run), nothing is
delivered or reported up unless the peer proved the secret, and no session is
left behind once the peer is gone.

beacons: discovery datagrams, raw or correctly signed around a fuzzed body; the
property is no exception, and a peer address is only added for a well-formed beacon
of our cluster, from an address it advertises.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import msgspec
import trio
import trio.testing
import trio_websocket

from exo_trio.cluster_messages import ClusterMessage
from exo_trio.net import auth, wire
from exo_trio.net.discovery import Discovery, decode_beacon, encode_beacon
from exo_trio.net.links import PeerInfo, PeerLinks
from fuzz.checks import PropertyViolation
from fuzz.quiet import quiet

# Failures found by this fuzzer that are reported but not yet fixed in exo_trio/net
# (see docs/fuzzing.md). A non-strict run tolerates them so that it can search past
# them; tests/test_fuzz.py replays each strictly, as an expected failure.
KNOWN_OPEN: tuple[str, ...] = ()  # every bug the fuzzer found here is fixed

SECRET = b"fuzz cluster secret"
CLUSTER = "fuzz-cluster"
OUR_ID = "node-m"  # peers named "node-a" make us wait for ACTIVATE; "node-z" make us decide
_OP = struct.Struct(">BH")


class LogCatcher(logging.Handler):
    """Remembers link log records that mean an unexpected exception."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "unexpectedly" in record.getMessage():
            exc = record.exc_info[1] if record.exc_info else None
            self.unexpected.append(f"{record.getMessage()}: {exc!r}")


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](1)

    async def accept(self) -> trio.abc.Stream:
        return await self.receive.receive()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def ops(data: bytes) -> list[tuple[int, bytes]]:
    """The script: (opcode, payload) items, each `op | length (2 bytes) | payload`."""
    out = []
    pos = 0
    while pos + _OP.size <= len(data) and len(out) < 64:
        op, length = _OP.unpack_from(data, pos)
        pos += _OP.size
        out.append((op, data[pos : pos + length]))
        pos += length
    return out


def op(code: int, payload: bytes = b"") -> bytes:
    return _OP.pack(code, len(payload)) + payload


class Peer:
    """The hostile side of one link: plays a script over a real websocket."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, dialer: bool) -> None:
        self.ws = ws
        self.dialer = dialer
        self.key = auth.link_key(SECRET)
        self.ephemeral = auth.Ephemeral(bytes([7]) * 32)
        self.mine: bytes | None = None
        self.theirs: bytes | None = None
        self.tx: auth.FrameCipher | None = None
        self.last_frame: bytes | None = None

    def hello(self, payload: bytes) -> wire.Hello:
        b = payload.ljust(8, b"\0")
        node_id = ("node-a", "node-z", OUR_ID, "", "x" * 200, payload[8:40].decode("latin-1"))[
            b[0] % 6
        ]
        return wire.Hello(
            version=wire.PROTOCOL_VERSION if b[1] % 4 else b[1],
            cluster_id=CLUSTER if b[2] % 4 else payload[:16].decode("latin-1"),
            node_id=node_id,
            incarnation="fuzz" if b[3] % 2 else "",
            nonce=bytes(wire.NONCE_BYTES if b[4] % 4 else b[4] % 64),
            listen_port=(b[5] << 8 | b[6]) * (1 if b[7] % 2 else 1000),
            addresses=[wire.AdvertisedAddress("127.0.0.1", 1)] * (b[7] % 3 * 40),
            # Mostly a real key; else a low-order one (all zeros) or a bad length.
            ephemeral=(self.ephemeral.public, bytes(32), self.ephemeral.public, payload[:5])[
                b[4] >> 3 & 3
            ],
        )

    def master(self) -> bytes | None:
        """The handshake's master key, once both Hellos are known (None before, or
        when our node's ephemeral key is unusable)."""
        if self.mine is None or self.theirs is None:
            return None
        theirs = wire.handshake_decoder.decode(self.theirs)
        assert isinstance(theirs, wire.Hello)
        shared = self.ephemeral.exchange(theirs.ephemeral)
        if shared is None:
            return None
        if self.dialer:
            digest = auth.transcript(self.mine, self.theirs)
        else:
            digest = auth.transcript(self.theirs, self.mine)
        return auth.master_key(self.key, shared, digest)

    def ciphers(self) -> auth.FrameCipher | None:
        master = self.master()
        if self.tx is None and master is not None:
            self.tx, _ = auth.session_ciphers(master, dialer=self.dialer)
        return self.tx

    async def play(self, script: list[tuple[int, bytes]]) -> None:
        for code, payload in script:
            await self.step(code % 10, payload)

    async def step(self, code: int, payload: bytes) -> None:
        ws = self.ws
        if code == 0:
            await ws.send_message(payload)
        elif code == 1:
            await ws.send_message(payload.decode("latin-1"))
        elif code == 2:
            self.mine = wire.encode_handshake(self.hello(payload))
            await ws.send_message(self.mine)
        elif code == 3:
            with trio.move_on_after(1 + (payload[0] if payload else 0) % 8):
                message = await ws.get_message()
                if isinstance(message, bytes) and self.theirs is None:
                    try:
                        if isinstance(wire.handshake_decoder.decode(message), wire.Hello):
                            self.theirs = message
                    except msgspec.DecodeError:
                        pass
        elif code == 4:
            master = self.master() or bytes(32)
            role = "dialer" if self.dialer else "acceptor"
            proof = auth.proof(master, role)
            if payload and payload[0] % 2:
                proof = payload[: len(proof)]
            await ws.send_message(wire.encode_handshake(wire.Proof(proof)))
        elif code in (5, 6):
            cipher = self.ciphers()
            kind = (payload[0] if payload else 0) % 8 if code == 5 else wire.KIND_MESSAGE
            body = payload[1:] if code == 5 else payload
            # Without session keys (no handshake yet): a frame that cannot open.
            sealed = cipher.seal(kind, body) if cipher is not None else body + bytes(16)
            self.last_frame = wire.pack_frame(kind, sealed)
            await ws.send_message(self.last_frame)
        elif code == 7:
            code_value = 1000 + (payload[0] if payload else 0) * 13 % 4000
            await ws.aclose(code_value, payload[1:40].decode("latin-1"))
        elif code == 8:
            await trio.sleep((payload[0] if payload else 1) * 0.05)
        elif self.last_frame is not None:
            await ws.send_message(self.last_frame)  # a replay


def known_open(text: str) -> bool:
    return any(marker in text for marker in KNOWN_OPEN)


async def run_link(data: bytes, strict: bool = True) -> dict[str, int]:
    """Play one script; returns what happened (for tests: did the link come up?)."""
    mode = data[0] if data else 0
    script = ops(data[1:])
    dialer = not mode % 2  # the fuzz peer dials (our node accepts), or the reverse
    listener = MemoryListener()
    ups: list[PeerInfo] = []
    delivered: list[Any] = []
    connects = 0
    peer_stream: trio.MemoryReceiveChannel[trio.abc.Stream]
    send_peer, peer_stream = trio.open_memory_channel[trio.abc.Stream](1)

    async def listen(host: str, port: int) -> list[trio.abc.Listener[Any]]:
        return [listener]

    async def connector(host: str, port: int) -> trio.abc.Stream:
        nonlocal connects
        connects += 1
        if connects > 1:
            raise OSError("the fuzz peer takes one connection")
        ours, theirs = trio.testing.memory_stream_pair()
        send_peer.send_nowait(theirs)
        return ours

    links: PeerLinks[Any] = PeerLinks(
        OUR_ID,
        CLUSTER,
        SECRET,
        ClusterMessage,
        on_message=lambda peer, message: delivered.append(message),
        on_peer_up=ups.append,
        on_peer_down=lambda peer, reason: None,
        listen_host="127.0.0.1",
        peers=[] if dialer else [("127.0.0.1", 1)],
        advertise=[],
        listener=listen,
        connector=connector,
        token_bytes=lambda n: bytes(n),
    )
    catcher = LogCatcher()
    logger = logging.getLogger("exo_trio.net.links")
    logger.addHandler(catcher)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            if dialer:
                ours, theirs = trio.testing.memory_stream_pair()
                await listener.send.send(ours)
                host_stream = theirs
            else:
                host_stream = await peer_stream.receive()
            async with trio.open_nursery() as ws_nursery:
                try:
                    if dialer:
                        resource = wire.LINK_RESOURCE if mode % 4 != 3 else "/other"
                        ws = await trio_websocket.wrap_client_stream(
                            ws_nursery,
                            host_stream,
                            "node",
                            resource,  # type: ignore[arg-type]
                        )
                    else:
                        request = await trio_websocket.wrap_server_stream(ws_nursery, host_stream)  # type: ignore[arg-type]
                        ws = await request.accept()
                    await Peer(ws, dialer).play(script)
                    await ws.aclose()
                except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError):
                    pass  # our node closed the link on the peer: the expected outcome
                except trio.BrokenResourceError:
                    pass
                await host_stream.aclose()
                ws_nursery.cancel_scope.cancel()
            # The peer is gone: our node must be left with no link and no handshake.
            with trio.fail_after(60):
                while links.peers() or links._pending_inbound or (not dialer and connects < 2):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        raise PropertyViolation("a session outlived its peer") from None
    finally:
        logger.removeHandler(catcher)
    unexpected = [m for m in catcher.unexpected if strict or not known_open(m)]
    if unexpected:
        raise PropertyViolation(f"link failed unexpectedly: {unexpected[0]}")
    if delivered and not ups:
        raise PropertyViolation("delivered messages on a link that never came up")
    return {"ups": len(ups), "delivered": len(delivered), **links.stats}


class LinkHarness:
    def __init__(self, strict: bool = False) -> None:
        # Links log every refused peer; the catcher above still sees the errors.
        self.restore = quiet({"exo_trio.net.links": logging.ERROR})
        self.strict = strict

    def one(self, data: bytes) -> None:
        try:
            trio.run(
                run_link, data, self.strict, clock=trio.testing.MockClock(autojump_threshold=0)
            )
        except PropertyViolation:
            raise
        except BaseException as exc:
            raise PropertyViolation(f"escaped the links: {exc!r}") from exc

    def close(self) -> None:
        self.restore()


class FakeLinks:
    """The part of PeerLinks discovery uses, recording what it is told."""

    node_id = OUR_ID
    cluster_id = CLUSTER
    secret = SECRET
    incarnation = "fuzz"
    listen_port = 52416
    advertised_addresses: list[wire.AdvertisedAddress] = []

    def __init__(self) -> None:
        self.added: list[tuple[str, int, str | None]] = []

    def add_peer_address(self, host: str, port: int, node_id: str | None = None) -> bool:
        self.added.append((host, port, node_id))
        return True


class BeaconHarness:
    def __init__(self, strict: bool = False) -> None:
        self.restore = quiet({"exo_trio.net.discovery": logging.ERROR})
        self.key = auth.beacon_key(SECRET)
        self.strict = strict

    def one(self, data: bytes) -> None:
        if not data:
            return
        mode, body = data[0], data[1:]
        packet = body
        if mode % 2:
            # Correctly signed: the fuzzer reaches what is behind the tag.
            signed = wire.BEACON_MAGIC + body
            packet = wire.BEACON_MAGIC + auth.beacon_tag(self.key, signed) + body
        source = ("127.0.0.1", "10.0.0.9", "::1")[mode // 2 % 3]
        links = FakeLinks()
        try:
            Discovery(links).handle_datagram(packet, (source, 52416))
            beacon = decode_beacon(packet, self.key)
        except Exception as exc:
            if not self.strict and known_open(repr(exc)):
                return
            raise PropertyViolation(f"beacon handling raised {exc!r}") from exc
        for host, port, node_id in links.added:
            if beacon is None or node_id == OUR_ID or beacon.cluster_id != CLUSTER:
                raise PropertyViolation(f"added {host}:{port} from a beacon it should ignore")
            if host not in {a.host for a in beacon.addresses} or not 0 < port <= 65535:
                raise PropertyViolation(f"added {host}:{port}, which the beacon does not advertise")
        if beacon is not None:
            again = decode_beacon(encode_beacon(beacon, self.key), self.key)
            if again != beacon:
                raise PropertyViolation("a beacon does not survive a round trip")

    def close(self) -> None:
        self.restore()


def make(name: str) -> LinkHarness | BeaconHarness:
    return BeaconHarness() if name == "beacons" else LinkHarness()
