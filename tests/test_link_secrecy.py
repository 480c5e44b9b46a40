"""Links keep recorded traffic secret even after the cluster secret leaks.

Two real PeerLinks talk over in-memory streams while a tap records every byte of
the link. Afterwards the test plays an attacker who has the cluster secret and the
recording: it parses the websocket frames, rebuilds the transcript, and tries every
key it can compute. Without an ephemeral private key (gone after the handshake)
nothing opens; as a control, with the private key (which the test can get from the
links' randomness seam) the same frames open, so the parsing and decryption really
work and the failure above is the protocol's doing.
"""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.testing
from wsproto.frame_protocol import FrameProtocol, Opcode

from exo_trio.net import auth, wire
from exo_trio.net.links import PeerLinks, WeakSecretError

SECRET = b"a cluster secret that leaks later"
PLAINTEXT = "the prompt: meet me by the old oak at midnight"


class Msg(msgspec.Struct):
    text: str


class Tap(trio.abc.Stream):
    """The dialer's end of the connection, recording both directions."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = bytearray()  # dialer -> acceptor
        self.received = bytearray()  # acceptor -> dialer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


def websocket_messages(raw: bytes, *, sent_by_client: bool) -> list[bytes]:
    """The binary messages in one direction of a recorded websocket connection."""
    body = raw[raw.index(b"\r\n\r\n") + 4 :]  # after the HTTP upgrade
    frames = FrameProtocol(client=not sent_by_client, extensions=[])
    frames.receive_bytes(body)
    messages, part = [], b""
    for frame in frames.received_frames():
        if frame.opcode in (Opcode.BINARY, Opcode.CONTINUATION):
            part += bytes(frame.payload)
            if frame.message_finished:
                messages.append(part)
                part = b""
    return messages


async def record_a_session(tokens: list[bytes]) -> Tap:
    def token_bytes(n: int) -> bytes:
        value = bytes((len(tokens) * 7 + i) % 256 for i in range(n))
        tokens.append(value)
        return value

    server_end: trio.MemorySendChannel[trio.abc.Stream]
    server_end, accepted = trio.open_memory_channel[trio.abc.Stream](1)
    taps: list[Tap] = []

    class Listener(trio.abc.Listener[trio.abc.Stream]):
        async def accept(self) -> trio.abc.Stream:
            return await accepted.receive()

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    async def listen(host: str, port: int) -> list[Listener]:
        return [Listener()]

    async def connect(host: str, port: int) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        server_end.send_nowait(server)
        taps.append(Tap(client))
        return taps[-1]

    got: list[Msg] = []

    def links(node_id: str, peers: list[tuple[str, int]]) -> PeerLinks[Msg]:
        return PeerLinks(
            node_id,
            "c",
            SECRET,
            Msg,
            on_message=lambda peer, message: got.append(message),
            on_peer_up=lambda info: None,
            on_peer_down=lambda peer, reason: None,
            listen_host="127.0.0.1",
            peers=peers,
            advertise=[],
            listener=listen,
            connector=connect,
            token_bytes=token_bytes,
        )

    a, b = links("a", []), links("b", [("a", 1)])
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        while "a" not in b.peers() or "b" not in a.peers():
            await trio.sleep(0.01)
        b.send("a", Msg(PLAINTEXT))
        while not got:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got == [Msg(PLAINTEXT)]
    return taps[0]


def open_all(master: bytes, messages: list[bytes]) -> list[bytes] | None:
    """Open the dialer's data frames with the keys `master` gives, or None."""
    _, receive = auth.session_ciphers(master, dialer=False)  # as the acceptor reads them
    bodies = []
    for message in messages:
        frame = wire.unpack_frame(message)
        assert frame is not None
        body = receive.open(*frame)
        if body is None:
            return None
        bodies.append(body)
    return bodies


async def test_a_leaked_secret_does_not_decrypt_a_recorded_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tokens: list[bytes] = []
    tap = await record_a_session(tokens)
    assert PLAINTEXT.encode() not in bytes(tap.sent)

    # The attacker's side: the secret, and the recording.
    from_dialer = websocket_messages(bytes(tap.sent), sent_by_client=True)
    from_acceptor = websocket_messages(bytes(tap.received), sent_by_client=False)
    dialer_hello, dialer_proof, *data = from_dialer
    acceptor_hello = from_acceptor[0]
    hellos = [wire.handshake_decoder.decode(m) for m in (dialer_hello, acceptor_hello)]
    assert all(isinstance(h, wire.Hello) for h in hellos)
    dialer_public, acceptor_public = (h.ephemeral for h in hellos)  # type: ignore[union-attr]
    digest = auth.transcript(dialer_hello, acceptor_hello)
    key = auth.link_key(SECRET)
    proof = wire.handshake_decoder.decode(dialer_proof)
    assert isinstance(proof, wire.Proof) and data

    # Everything computable without a private key: nothing opens, and not even the
    # right secret can be confirmed against the recorded proof (so a weak one
    # cannot be guessed from a recording either).
    guesses = [b"", dialer_public, acceptor_public, dialer_public + acceptor_public, bytes(32)]
    for guess in guesses:
        master = auth.master_key(key, guess, digest)
        assert open_all(master, data) is None
        assert not auth.verify_proof(master, "dialer", proof.proof)

    # Control: with the dialer's ephemeral private key the same frames do open.
    keys = [auth.Ephemeral(t) for t in tokens if len(t) == 32]
    private = next(k for k in keys if k.public == dialer_public)
    shared = private.exchange(acceptor_public)
    assert shared is not None
    master = auth.master_key(key, shared, digest)
    assert auth.verify_proof(master, "dialer", proof.proof)
    bodies = open_all(master, data)
    assert bodies is not None and any(PLAINTEXT.encode() in body for body in bodies)


def test_a_weak_secret_is_refused_unless_allowed() -> None:
    def links(secret: bytes, **options: bool) -> PeerLinks[Msg]:
        return PeerLinks(
            "a", "c", secret, Msg, lambda p, m: None, lambda i: None, lambda p, r: None, **options
        )

    with pytest.raises(WeakSecretError, match="15 bytes; at least 16"):
        links(b"x" * 15)
    links(b"x" * 16)
    links(b"x" * 15, allow_weak_secret=True)


def test_generated_secrets_are_strong_and_distinct() -> None:
    secrets = {auth.generate_secret() for _ in range(20)}
    assert len(secrets) == 20
    assert all(len(s.encode()) >= 32 for s in secrets)
