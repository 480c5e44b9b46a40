"""One connection between two nodes, from websocket upgrade to close.

A session authenticates the peer (an ephemeral X25519 exchange and mutual HMAC
proofs of the cluster secret keyed by it, auth.py), lets the deciding
side (the smaller node id) keep or refuse it, and then runs three tasks: a reader
that verifies and delivers frames in order, a writer that drains the peer's outbox
and sends heartbeats when idle, and a watchdog that closes the link when nothing
has arrived for `dead_after` seconds.

Link failures of every kind (network, protocol, MAC, timeouts) end only this
session and are logged; they never escape `Session.run`. A caller callback that
raises is a bug in the caller and escapes as `CallbackError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec
import trio
import trio_websocket
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from exo_trio.net import auth, wire

log = logging.getLogger("exo_trio.net.links")
T = TypeVar("T")

AUTH_FAILED = (
    "authentication failed: the peer's proof does not match our cluster secret "
    "(wrong or missing cluster secret on one side)"
)

_SELF = "this address is our own listener"

# Close codes we receive, as text. The peer's own reason string is untrusted and is
# only appended, quoted and truncated.
_CLOSE_TEXT = {
    wire.CLOSE_NORMAL: "closed by peer",
    wire.CLOSE_GOING_AWAY: "peer is shutting down",
    1006: "connection lost",
    1009: "message over the size cap",
    wire.CLOSE_PROTOCOL: "peer reports a protocol error",
    wire.CLOSE_AUTH: "peer refused the link: authentication failed (cluster secret mismatch)",
    wire.CLOSE_DUPLICATE: "peer kept another link to us (duplicate refused)",
    wire.CLOSE_BAD_MAC: "peer reports a bad MAC on our frames",
    wire.CLOSE_TIMEOUT: "peer timed out waiting for our heartbeats",
    wire.CLOSE_SELF: "peer has our node id",
    wire.CLOSE_CLUSTER: "peer is in another cluster",
    wire.CLOSE_REPLACED: "peer replaced this link with a newer one",
}
# How loudly a session that ended with this code is logged.
_QUIET = {wire.CLOSE_DUPLICATE, wire.CLOSE_SELF, wire.CLOSE_GOING_AWAY, wire.CLOSE_NORMAL}
_LOUD = {wire.CLOSE_AUTH, wire.CLOSE_BAD_MAC, wire.CLOSE_PROTOCOL, wire.CLOSE_CLUSTER, 1009}


class LinkError(Exception):
    """This link must close, with a websocket close code and a reason for the log."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class CallbackError(Exception):
    """A callback given to PeerLinks raised. It is a caller bug, so it is not treated
    as a link failure: it propagates out of `PeerLinks.run`."""


def describe_close(reason: CloseReason | None) -> tuple[int, str]:
    code = reason.code if reason is not None else 1006
    text = _CLOSE_TEXT.get(code, f"closed by peer (code {code})")
    if reason is not None and reason.reason and code not in (1006, 1009):
        text += f" ({reason.reason[:80]!r})"
    return code, text


class SessionOwner(Protocol):
    """What a session needs from PeerLinks."""

    node_id: str
    cluster_id: str
    incarnation: str
    key: bytes
    heartbeat_interval: float
    ping_interval: float
    dead_after: float
    handshake_timeout: float
    max_message_bytes: int
    decoder: msgspec.msgpack.Decoder[Any]
    token_bytes: Callable[[int], bytes]
    stats: dict[str, int]

    def make_hello(self, nonce: bytes, ephemeral: bytes) -> wire.Hello: ...
    def promote(self, session: Session, *, decider: bool) -> str | None: ...
    def deliver(self, session: Session, message: object) -> None: ...
    def session_ended(self, session: Session) -> None: ...


class _ActivityStream(trio.abc.Stream):
    """Records when bytes last arrived: any traffic proves the peer alive, so a large
    message that takes a while to arrive does not look like a dead peer."""

    def __init__(self, inner: trio.abc.Stream, session: Session) -> None:
        self.inner = inner
        self._session = session

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self._session.bytes_out += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        session = self._session
        if data:
            session.last_rx = trio.current_time()
            session.bytes_in += len(data)
            # The handshake never lets a legitimate peer send app data before we have
            # verified it, so this cap cannot cut a good link.
            if not session.authenticated and session.bytes_in > wire.MAX_PREAUTH_BYTES:
                session.set_reason(
                    wire.CLOSE_PROTOCOL,
                    f"more than {wire.MAX_PREAUTH_BYTES} bytes before authentication",
                )
                raise trio.BrokenResourceError("too much data before authentication")
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class Session:
    """State and tasks of one link. `address` is the dialed (host, port) for an
    outbound link, the remote socket address (if known) for an inbound one."""

    def __init__(
        self,
        owner: SessionOwner,
        stream: trio.abc.Stream,
        *,
        outbound: bool,
        address: tuple[str, int] | None,
    ) -> None:
        self.owner = owner
        self.outbound = outbound
        self.address = address
        self.peer: wire.Hello | None = None
        self.close_code = wire.CLOSE_NORMAL
        self.reason: str | None = None
        self.authenticated = False  # both proofs checked: self.peer can be trusted
        self.is_self = False  # we dialed our own listener
        self.promoted = False
        self.demoted = False
        self.info: Any = None  # the PeerInfo PeerLinks made when it promoted this link
        self.counted_inbound = False  # PeerLinks' count of unauthenticated connections
        self._logged = False
        self.last_rx = self.last_tx = trio.current_time()
        self.bytes_in = self.bytes_out = 0
        # Latency: heartbeats carry probes (wire.pack_probe). `rtt` is the smoothed
        # round trip in seconds (None until the peer answered one); `_owed` is the
        # peer's last ping and when it came, answered in our next heartbeat.
        self.rtt: float | None = None
        self._ping_at = self.last_tx + owner.ping_interval
        self._owed: tuple[float, float] | None = None
        self.scope = trio.CancelScope()
        # Unbounded by design: send() is synchronous and must never block or refuse a
        # connected peer. Backlog is observable through PeerLinks.backlog().
        self.outbox_send, self.outbox_recv = trio.open_memory_channel[bytes](math.inf)
        # Messages sent to this link and not yet written to its socket. Not the
        # outbox's length: a message handed straight to a waiting writer leaves the
        # outbox empty before the writer has run (a drain that trusted that cut
        # the shutting_down events it had just sent).
        self.unsent = 0
        self._stream = _ActivityStream(stream, self)
        self._tx: auth.FrameCipher | None = None
        self._rx: auth.FrameCipher | None = None

    @property
    def peer_id(self) -> str | None:
        return self.peer.node_id if self.peer is not None else None

    def describe(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}" if self.address else "?"
        direction = "to" if self.outbound else "from"
        return f"link {direction} {self.peer_id or '?'} ({where})"

    def close(self, code: int, reason: str) -> None:
        """Ask this link to close; the first reason given is the one reported."""
        self.set_reason(code, reason)
        self.scope.cancel()

    # --- lifetime ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                async with trio.open_nursery() as ws_nursery:  # trio-websocket's reader
                    try:
                        await self._run(ws_nursery)
                    finally:
                        ws_nursery.cancel_scope.cancel()
            except* CallbackError:
                raise
            except* trio.Cancelled:
                self.set_reason(wire.CLOSE_GOING_AWAY, "shutting down")
                raise
            except* Exception as group:
                self._record_failure(group)
        finally:
            self.owner.session_ended(self)
            self._log_end()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    async def _run(self, ws_nursery: trio.Nursery) -> None:
        ws: WebSocketConnection | None = None
        try:
            # close() cancels this scope, whether the link is still in its handshake
            # or already running.
            with self.scope:
                try:
                    with trio.fail_after(self.owner.handshake_timeout):
                        ws = await self._open_websocket(ws_nursery)
                        await self._authenticate(ws)
                        await self._activate(ws)
                except trio.TooSlowError:
                    raise LinkError(wire.CLOSE_PROTOCOL, "handshake timed out") from None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, ws)
                    nursery.start_soon(self._watchdog)
                    await self._reader(ws)
                    self.scope.cancel()  # the reader saw the end: stop writer and watchdog
        except LinkError as exc:
            self.set_reason(exc.code, exc.reason)
        finally:
            # Still cancelled after our own scope has exited, and not because
            # trio-websocket's reader failed: the node is shutting down.
            shutting_down = (
                trio.current_effective_deadline() == -math.inf
                and not ws_nursery.cancel_scope.cancel_called
            )
            if shutting_down:
                self.set_reason(wire.CLOSE_GOING_AWAY, "shutting down")
            # Report the peer down now, before the goodbye below can take any time.
            self.owner.session_ended(self)
            self._log_end()
            if ws is not None:
                # Send the close code so the peer logs why; don't wait long for its
                # answer (it may be the silent one), and hardly at all on shutdown.
                grace = 0.05 if shutting_down else 0.5
                with trio.CancelScope(deadline=trio.current_time() + grace, shield=True):
                    await ws.aclose(self.close_code, (self.reason or "")[:100])

    def set_reason(self, code: int, reason: str) -> None:
        """Record why the link ends without cancelling anything; first reason wins."""
        if self.reason is None:
            self.close_code, self.reason = code, reason

    def _record_failure(self, group: BaseExceptionGroup[Exception]) -> None:
        """Name what broke the link. Expected network failures get one line; anything
        else is logged with its traceback, since it may be a bug."""
        for exc in _leaves(group):
            if isinstance(exc, trio_websocket.ConnectionRejected):
                self.set_reason(wire.CLOSE_PROTOCOL, f"websocket upgrade rejected ({exc})")
            elif isinstance(exc, trio_websocket.HandshakeError | ConnectionClosed):
                self.set_reason(wire.CLOSE_PROTOCOL, f"websocket failed: {exc!r}")
            elif isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
                self.set_reason(1006, f"connection lost ({exc!r})")
            else:
                log.error("%s failed unexpectedly", self.describe(), exc_info=exc)
                self.set_reason(wire.CLOSE_PROTOCOL, f"internal error: {exc!r}")

    def _log_end(self) -> None:
        if self._logged:
            return
        self._logged = True
        reason = self.reason or "link closed"
        if self.promoted:
            level = logging.WARNING if self.close_code in _LOUD else logging.INFO
            log.log(level, "%s down: %s", self.describe(), reason)
        elif self.close_code in _LOUD:
            log.warning("%s refused: %s", self.describe(), reason)
        elif self.close_code in _QUIET:
            log.debug("%s not kept: %s", self.describe(), reason)
        else:
            log.info("%s failed before it came up: %s", self.describe(), reason)

    # --- handshake --------------------------------------------------------------

    async def _open_websocket(self, nursery: trio.Nursery) -> WebSocketConnection:
        options: dict[str, Any] = {
            "message_queue_size": 4,
            "max_message_size": self.owner.max_message_bytes
            + wire.BATCH_HEADER_BYTES
            + wire.FRAME_OVERHEAD,
            "receive_buffer_size": 65536,
        }
        if self.outbound:
            assert self.address is not None
            host = f"{self.address[0]}:{self.address[1]}"
            stream: Any = self._stream  # trio-websocket's hint says SocketStream; any works
            return await trio_websocket.wrap_client_stream(
                nursery, stream, host, wire.LINK_RESOURCE, **options
            )
        request = await trio_websocket.wrap_server_stream(nursery, self._stream, **options)
        if request.path != wire.LINK_RESOURCE:
            await request.reject(404)
            raise LinkError(wire.CLOSE_PROTOCOL, f"not a link request: {request.path[:64]!r}")
        return await request.accept()

    async def _authenticate(self, ws: WebSocketConnection) -> None:
        """Mutual proof of the cluster secret, keyed by the ephemeral exchange (see
        auth.py). The dialer proves first: a process that merely reaches our
        listener gets no proof of ours to test guessed secrets against (only a node
        we chose to dial, configured or found by a signed beacon, ever does)."""
        owner = self.owner
        ephemeral = auth.Ephemeral(owner.token_bytes(auth.EPHEMERAL_BYTES))
        hello = owner.make_hello(owner.token_bytes(wire.NONCE_BYTES), ephemeral.public)
        mine = wire.encode_handshake(hello)
        if self.outbound:
            await ws.send_message(mine)
            theirs = await self._receive_hello(ws)
            master = self._master_key(ephemeral, mine, theirs)
            proof = auth.proof(master, "dialer")
            await ws.send_message(wire.encode_handshake(wire.Proof(proof)))
            their_proof = await self._receive_handshake(ws, wire.Proof)
            if not auth.verify_proof(master, "acceptor", their_proof.proof):
                owner.stats["auth_failures"] += 1
                raise LinkError(wire.CLOSE_AUTH, AUTH_FAILED)
            self._authenticated(master)
        else:
            theirs = await self._receive_hello(ws)
            await ws.send_message(mine)
            if self.is_self:
                raise LinkError(wire.CLOSE_SELF, _SELF)
            master = self._master_key(ephemeral, theirs, mine)
            their_proof = await self._receive_handshake(ws, wire.Proof)
            if not auth.verify_proof(master, "dialer", their_proof.proof):
                owner.stats["auth_failures"] += 1
                raise LinkError(wire.CLOSE_AUTH, AUTH_FAILED)
            # Before our proof leaves: a deciding dialer answers it with ACTIVATE.
            self._authenticated(master)
            proof = auth.proof(master, "acceptor")
            await ws.send_message(wire.encode_handshake(wire.Proof(proof)))

    def _master_key(
        self, ephemeral: auth.Ephemeral, dialer_hello: bytes, acceptor_hello: bytes
    ) -> bytes:
        assert self.peer is not None
        shared = ephemeral.exchange(self.peer.ephemeral)
        if shared is None:
            raise LinkError(wire.CLOSE_PROTOCOL, "bad hello: unusable ephemeral key")
        return auth.master_key(
            self.owner.key, shared, auth.transcript(dialer_hello, acceptor_hello)
        )

    def _authenticated(self, master: bytes) -> None:
        self._tx, self._rx = auth.session_ciphers(master, dialer=self.outbound)
        self.authenticated = True

    async def _receive_hello(self, ws: WebSocketConnection) -> bytes:
        raw = await self._receive_raw(ws)
        hello = self._decode_handshake(raw, wire.Hello)
        problem = wire.check_hello(hello)
        if problem is not None:
            raise LinkError(wire.CLOSE_PROTOCOL, f"bad hello: {problem}")
        # Not trusted until the proofs check out (self.authenticated); recorded now so
        # logs can name the peer.
        self.peer = hello
        if hello.cluster_id != self.owner.cluster_id:
            raise LinkError(
                wire.CLOSE_CLUSTER,
                f"cluster id mismatch: peer is in {hello.cluster_id[:64]!r}, "
                f"we are in {self.owner.cluster_id!r}",
            )
        if hello.node_id == self.owner.node_id:
            if hello.incarnation != self.owner.incarnation:
                raise LinkError(wire.CLOSE_SELF, "the peer claims our node id (two nodes, one id?)")
            # We dialed ourselves. The acceptor answers its Hello before closing, so the
            # dialer sees its own identity and stops dialing this address for good.
            self.is_self = True
            if self.outbound:
                raise LinkError(wire.CLOSE_SELF, _SELF)
        return raw

    async def _receive_handshake(self, ws: WebSocketConnection, kind: type[T]) -> T:
        return self._decode_handshake(await self._receive_raw(ws), kind)

    async def _receive_raw(self, ws: WebSocketConnection) -> bytes:
        try:
            data = await ws.get_message()
        except ConnectionClosed as exc:
            raise LinkError(*describe_close(exc.reason)) from None
        if not isinstance(data, bytes):
            raise LinkError(wire.CLOSE_PROTOCOL, "protocol error: text websocket message")
        return data

    def _decode_handshake(self, raw: bytes, kind: type[T]) -> T:
        try:
            message = wire.handshake_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise LinkError(wire.CLOSE_PROTOCOL, f"bad handshake message: {exc}") from None
        if not isinstance(message, kind):
            raise LinkError(wire.CLOSE_PROTOCOL, f"expected {kind.__name__} in handshake")
        return message

    async def _activate(self, ws: WebSocketConnection) -> None:
        """Exactly one link per pair: the smaller node id decides, in one synchronous
        step, whether this link becomes the pair's link, and tells the other side with
        an authenticated ACTIVATE frame (or closes it as a duplicate). The other side
        never keeps a link it has not been told to keep.

        A deciding acceptor first waits for the dialer's READY (the dialer checks the
        acceptor's proof last), so no side ever receives app data before it has
        verified the peer (see MAX_PREAUTH_BYTES). A deciding dialer needs no READY:
        the acceptor's proof itself says the acceptor checked the dialer's."""
        assert self.peer is not None
        decider = self.owner.node_id < self.peer.node_id
        if not self.outbound and decider:
            await self._expect_frame(ws, wire.KIND_READY)
        elif self.outbound and not decider:
            await self._send_frame(ws, wire.KIND_READY, b"")
        if decider:
            refusal = self.owner.promote(self, decider=True)
            if refusal is not None:
                raise LinkError(wire.CLOSE_DUPLICATE, refusal)
            await self._send_frame(ws, wire.KIND_ACTIVATE, b"")
        else:
            await self._expect_frame(ws, wire.KIND_ACTIVATE)
            self.owner.promote(self, decider=False)

    async def _expect_frame(self, ws: WebSocketConnection, expected: int) -> None:
        kind, _ = await self._next_frame(ws)
        if kind != expected:
            raise LinkError(
                wire.CLOSE_PROTOCOL, f"protocol error: expected frame kind {expected}, got {kind}"
            )

    # --- running link -----------------------------------------------------------

    async def _next_frame(self, ws: WebSocketConnection) -> tuple[int, bytes]:
        data = await self._receive_raw(ws)
        frame = wire.unpack_frame(data)
        if frame is None:
            raise LinkError(wire.CLOSE_PROTOCOL, "protocol error: short frame")
        kind, sealed = frame
        assert self._rx is not None
        body = self._rx.open(kind, sealed)
        if body is None:
            self.owner.stats["mac_failures"] += 1
            log.error(
                "%s: bad MAC on frame %d; closing the link (tampered, replayed or corrupted)",
                self.describe(),
                self._rx.counter,
            )
            raise LinkError(wire.CLOSE_BAD_MAC, f"bad MAC on frame {self._rx.counter}")
        return kind, body

    async def _reader(self, ws: WebSocketConnection) -> None:
        decoder = self.owner.decoder
        try:
            while True:
                kind, body = await self._next_frame(ws)
                if self.demoted:
                    return  # replaced by a newer link: its messages are no longer ours
                if kind == wire.KIND_MESSAGE:
                    try:
                        messages = decoder.decode(body)
                    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                        raise LinkError(
                            wire.CLOSE_PROTOCOL, f"undecodable message: {exc}"
                        ) from None
                    for message in messages:
                        if self.demoted:
                            return
                        self.owner.deliver(self, message)
                elif kind == wire.KIND_HEARTBEAT:
                    self._on_probe(body)
                else:
                    raise LinkError(wire.CLOSE_PROTOCOL, f"unexpected frame kind {kind}")
        except LinkError as exc:
            self.close(exc.code, exc.reason)

    async def _writer(self, ws: WebSocketConnection) -> None:
        interval = self.owner.heartbeat_interval
        held: bytes | None = None  # taken from the outbox, too big for the last batch
        try:
            while True:
                payload, held = held, None
                if payload is None:
                    # Only the wait is cancellable; a send cancelled half-way would
                    # corrupt the websocket stream.
                    with trio.move_on_at(min(self.last_tx + interval, self._ping_at)):
                        payload = await self.outbox_recv.receive()
                if payload is None:
                    # Idle for an interval, or a ping is due: a busy link sends no
                    # idle heartbeats, but its latency is measured all the same.
                    await self._send_frame(ws, wire.KIND_HEARTBEAT, self._probe())
                else:
                    batch, held = self._take_batch(payload)
                    await self._send_frame(ws, wire.KIND_MESSAGE, wire.pack_batch(batch))
                    self.unsent -= len(batch)
        except ConnectionClosed as exc:
            self.close(*describe_close(exc.reason))

    def _probe(self) -> bytes:
        """A heartbeat's body: a ping when one is due, the answer to the peer's last
        ping if we owe one (a pong waits for the next heartbeat; `hold` says how
        long, so the peer's round trip does not count it), or nothing."""
        now = trio.current_time()
        ping = echo = hold = wire.NO_STAMP
        if now >= self._ping_at:
            ping, self._ping_at = now, now + self.owner.ping_interval
        if self._owed is not None:
            (echo, received), self._owed = self._owed, None
            hold = now - received
        if math.isnan(ping) and math.isnan(echo):
            return b""
        return wire.pack_probe(ping, echo, hold)

    def _on_probe(self, body: bytes) -> None:
        probe = wire.unpack_probe(body)
        if probe is None:
            return
        ping, echo, hold = probe
        now = trio.current_time()
        if not math.isnan(ping):
            self._owed = (ping, now)
        if math.isnan(echo) or math.isnan(hold):
            return
        sample = now - echo - hold
        if 0.0 <= sample < self.owner.dead_after:  # else not our ping, or a bogus one
            self.rtt = sample if self.rtt is None else 0.75 * self.rtt + 0.25 * sample

    def _take_batch(self, first: bytes) -> tuple[list[bytes], bytes | None]:
        """`first` and whatever else waits in the outbox, up to BATCH_BYTES (and the
        size cap); the message that would overflow the batch opens the next one."""
        limit = min(wire.BATCH_BYTES, self.owner.max_message_bytes)
        batch, size = [first], len(first)
        while size < limit:
            try:
                payload = self.outbox_recv.receive_nowait()
            except trio.WouldBlock:
                break
            if size + len(payload) > limit:
                return batch, payload
            batch.append(payload)
            size += len(payload)
        return batch, None

    async def _send_frame(self, ws: WebSocketConnection, kind: int, body: bytes) -> None:
        assert self._tx is not None
        sealed = self._tx.seal(kind, body)
        self.last_tx = trio.current_time()
        await ws.send_message(wire.pack_frame(kind, sealed))

    async def _watchdog(self) -> None:
        dead_after = self.owner.dead_after
        while True:
            deadline = self.last_rx + dead_after
            if trio.current_time() >= deadline:
                self.owner.stats["heartbeat_timeouts"] += 1
                self.close(
                    wire.CLOSE_TIMEOUT, f"heartbeat timeout: nothing received for {dead_after:g}s"
                )
                return
            await trio.sleep_until(deadline)


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found
