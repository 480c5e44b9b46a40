"""PeerLinks: this node's authenticated links to its peers.

One object per node. It listens, dials the configured and discovered peer
addresses (reconnecting with exponential backoff and jitter), keeps exactly one
link per peer, and hands the caller decoded messages through synchronous callbacks.
The protocol is in docs/links.md; one link's life is in `session.py`.

Everything that has an effect comes through a seam so the simulator can run this
code inside one `trio.run` under MockClock with in-memory streams: time is Trio's,
connections come from `connector`/`listener`, randomness from `token_bytes`/`rng`.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import msgspec
import trio

from exo_trio.net import auth, interfaces, wire
from exo_trio.net.session import CallbackError, Session
from exo_trio.net.wire import AdvertisedAddress

__all__ = [
    "CallbackError",
    "Connector",
    "InsecureAddressError",
    "ListenerFactory",
    "PeerInfo",
    "PeerLinks",
    "WeakSecretError",
]

log = logging.getLogger("exo_trio.net.links")

M = TypeVar("M")
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]
ListenerFactory = Callable[[str, int], Awaitable[Sequence[trio.abc.Listener[Any]]]]


class InsecureAddressError(ValueError):
    """A node without a cluster secret was asked to use a non-loopback address."""


class WeakSecretError(ValueError):
    """A cluster secret too short to withstand offline guessing (auth.MIN_SECRET_BYTES)."""


@dataclass(frozen=True)
class PeerInfo:
    """A connected peer, as reported to on_peer_up and by PeerLinks.peers().

    addresses: where the peer listens (every interface address with its listen
    port), ranked fastest-looking first (Thunderbolt/link-local before LAN before
    loopback), so placement can choose the path for mx.distributed.
    link_address: the remote end of the link in use: the dialed (host, port) for an
    outbound link, the peer's socket address for an inbound one (None if the stream
    has no socket, as in the simulator).
    incarnation: random per peer process start; a new value means the peer restarted.
    """

    node_id: str
    incarnation: str
    addresses: tuple[AdvertisedAddress, ...]
    link_address: tuple[str, int] | None
    outbound: bool
    since: float  # trio.current_time() when the link came up


@dataclass
class _Target:
    """An address we dial. peer_id is learned from the first handshake (or hinted
    by discovery) so the dialer can idle while that peer is linked another way."""

    host: str
    port: int
    peer_id: str | None
    configured: bool
    last_seen: float | None = None


async def open_tcp_listeners(host: str, port: int) -> Sequence[trio.abc.Listener[Any]]:
    return await trio.open_tcp_listeners(port, host=host or None)


async def open_tcp_stream(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class PeerLinks(Generic[M]):
    """Links to every peer of this node, carrying messages of `message_type`.

    Callbacks are synchronous and run in the task of the link they concern, in
    order: on_peer_up(info) before that link's first on_message(peer_id, message),
    on_peer_down(peer_id, reason) once after its last. A peer whose link is replaced
    (it restarted) is reported down, then up again. A callback that raises is a bug:
    the exception escapes run() wrapped in CallbackError.
    """

    def __init__(
        self,
        node_id: str,
        cluster_id: str,
        secret: bytes | None,
        message_type: Any,
        on_message: Callable[[str, M], None],
        on_peer_up: Callable[[PeerInfo], None],
        on_peer_down: Callable[[str, str], None],
        *,
        listen_host: str | None = None,
        listen_port: int = 0,
        peers: Sequence[tuple[str, int]] = (),
        heartbeat_interval: float = 0.5,
        ping_interval: float = 1.0,
        dead_after: float = 3.0,
        handshake_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        forget_after: float = 60.0,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
        max_pending_handshakes: int = 64,
        advertise: Sequence[AdvertisedAddress] | None = None,
        connector: Connector = open_tcp_stream,
        listener: ListenerFactory = open_tcp_listeners,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        rng: random.Random | None = None,
        allow_weak_secret: bool = False,
    ) -> None:
        if not node_id or len(node_id) > wire.MAX_NODE_ID:
            raise ValueError(f"node id must be 1 to {wire.MAX_NODE_ID} characters")
        if not cluster_id:
            raise ValueError("cluster id must not be empty")
        if secret is not None and not secret:
            raise ValueError("the cluster secret is empty; pass None for loopback-only links")
        if secret is not None and len(secret) < auth.MIN_SECRET_BYTES and not allow_weak_secret:
            raise WeakSecretError(
                f"the cluster secret is {len(secret)} bytes; at least {auth.MIN_SECRET_BYTES} "
                "are needed (`exo-trio secret` prints a strong one)"
            )
        if not 0 < heartbeat_interval < dead_after:
            raise ValueError("need 0 < heartbeat_interval < dead_after")
        if listen_host is None:
            listen_host = "0.0.0.0" if secret is not None else "127.0.0.1"
        if secret is None:
            for host in [listen_host, *(host for host, _ in peers)]:
                _require_loopback(host)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.secret = secret
        self.key = auth.link_key(secret)
        self.heartbeat_interval = heartbeat_interval
        # How often a link measures its round trip (a probe in a heartbeat).
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.handshake_timeout = handshake_timeout
        self.max_message_bytes = max_message_bytes
        # A message frame is a batch: a msgpack array of messages (wire.pack_batch).
        self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(list[message_type])
        self.token_bytes = token_bytes
        self.incarnation = token_bytes(8).hex()
        self.stats: dict[str, int] = {
            "auth_failures": 0,
            "mac_failures": 0,
            "heartbeat_timeouts": 0,
            "duplicates_refused": 0,
            "handshakes_shed": 0,
        }
        self._encoder = msgspec.msgpack.Encoder()
        self._on_message = on_message
        self._on_peer_up = on_peer_up
        self._on_peer_down = on_peer_down
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._bound_port: int | None = None
        self._advertise = list(advertise) if advertise is not None else None
        self._advertised: list[AdvertisedAddress] = []
        self._connect_timeout = connect_timeout
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._forget_after = forget_after
        self._max_pending = max_pending_handshakes
        self._connector = connector
        self._listener = listener
        self._rng = rng if rng is not None else random.Random()
        self._targets: dict[tuple[str, int], _Target] = {}
        for host, port in peers:
            self._targets.setdefault((host, port), _Target(host, port, None, configured=True))
        self._active: dict[str, Session] = {}
        self._pending_inbound = 0
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- public interface -------------------------------------------------------

    @property
    def listen_port(self) -> int | None:
        """The port actually bound (useful with listen_port=0), once run() started."""
        return self._bound_port

    @property
    def advertised_addresses(self) -> list[AdvertisedAddress]:
        return list(self._advertised)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and dial until cancelled. Reports the bound port through
        task_status.started(port) once listening, so `await nursery.start(links.run)`
        returns when peers can connect. Link failures never end run()."""
        if self._nursery is not None:
            raise RuntimeError("PeerLinks.run is already running")
        listeners = await self._listener(self._listen_host, self._listen_port)
        self._bound_port = _bound_port(listeners, self._listen_port)
        if self._advertise is not None:
            self._advertised = [_with_port(a, self._bound_port) for a in self._advertise]
        else:
            self._advertised = interfaces.advertised_addresses(self._listen_host, self._bound_port)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                serve = partial(trio.serve_listeners, handler_nursery=nursery)
                nursery.start_soon(serve, self._handle_inbound, listeners)
                for target in list(self._targets.values()):
                    nursery.start_soon(self._dial_loop, target)
                log.info(
                    "node %s listening on %s:%d (%s)",
                    self.node_id,
                    self._listen_host,
                    self._bound_port,
                    "authenticated" if self.secret is not None else "no secret: loopback only",
                )
                task_status.started(self._bound_port)
        finally:
            self._nursery = None

    def send(self, peer_id: str, message: M) -> bool:
        """Queue `message` for `peer_id` without blocking; False if not linked.

        True means it went into the current link's outbox, which is unbounded and
        sent in order. It is delivered unless that link dies first, in which case
        on_peer_down follows; nothing is carried over to a later link. Raises
        ValueError for a message over the size cap (a caller bug, not a link fault).
        """
        session = self._active.get(peer_id)
        if session is None:
            return False
        payload = self._encoder.encode(message)
        if len(payload) > self.max_message_bytes:
            raise ValueError(f"message of {len(payload)} bytes exceeds {self.max_message_bytes}")
        session.outbox_send.send_nowait(payload)
        session.unsent += 1
        return True

    def broadcast(self, message: M) -> list[str]:
        """send() to every linked peer, encoding once; returns the peer ids."""
        payload = self._encoder.encode(message)
        if len(payload) > self.max_message_bytes:
            raise ValueError(f"message of {len(payload)} bytes exceeds {self.max_message_bytes}")
        for session in self._active.values():
            session.outbox_send.send_nowait(payload)
            session.unsent += 1
        return list(self._active)

    def peers(self) -> dict[str, PeerInfo]:
        """The peers linked right now."""
        return {pid: s.info for pid, s in self._active.items() if s.info is not None}

    def rtt(self, peer_id: str) -> float | None:
        """The link's smoothed round trip in seconds, measured by heartbeat probes
        about every `ping_interval`; None if not linked or not measured yet."""
        session = self._active.get(peer_id)
        return session.rtt if session is not None else None

    def backlog(self, peer_id: str) -> int:
        """Messages queued for peer_id and not yet handed to its socket."""
        session = self._active.get(peer_id)
        if session is None:
            return 0
        return session.unsent

    def add_peer_address(self, host: str, port: int, node_id: str | None = None) -> bool:
        """Dial (host, port) from now on; for discovery. node_id, if known, lets the
        dialer stay idle while that peer is already linked. An address added here is
        forgotten after `forget_after` seconds without a refresh (another call) while
        it cannot be reached. Returns True if the address is new."""
        if self.secret is None and not interfaces.is_loopback(host):
            log.warning(
                "not dialing %s:%d: without a cluster secret links are loopback only", host, port
            )
            return False
        if node_id == self.node_id:
            return False
        now = _now()
        target = self._targets.get((host, port))
        if target is not None:
            target.last_seen = now
            if node_id is not None and target.peer_id is None:
                target.peer_id = node_id
            return False
        target = _Target(host, port, node_id, configured=False, last_seen=now)
        self._targets[(host, port)] = target
        if self._nursery is not None:
            self._nursery.start_soon(self._dial_loop, target)
        return True

    # --- what sessions call (SessionOwner) ----------------------------------------

    def make_hello(self, nonce: bytes, ephemeral: bytes) -> wire.Hello:
        return wire.Hello(
            version=wire.PROTOCOL_VERSION,
            cluster_id=self.cluster_id,
            node_id=self.node_id,
            incarnation=self.incarnation,
            nonce=nonce,
            listen_port=self._bound_port or 0,
            addresses=self._advertised[: wire.MAX_ADDRESSES],
            ephemeral=ephemeral,
        )

    def promote(self, session: Session, *, decider: bool) -> str | None:
        """Make `session` the link to its peer, or say why not (decider side only).

        Synchronous, so two links of one pair can never both pass the check. The
        decider refuses a second link from the same peer process; a link from a new
        incarnation means the peer restarted and replaces the stale one. The other
        side keeps whatever the decider activated, replacing what it had."""
        peer = session.peer
        assert peer is not None
        current = self._active.get(peer.node_id)
        if current is not None:
            assert current.peer is not None
            restarted = current.peer.incarnation != peer.incarnation
            if decider and not restarted:
                self.stats["duplicates_refused"] += 1
                return "duplicate link: this peer is already linked"
            reason = "peer restarted" if restarted else "replaced by a newer link"
            current.close(wire.CLOSE_REPLACED, reason)
            self._demote(current, reason)
        self._end_handshake(session)
        session.promoted = True
        session.info = PeerInfo(
            node_id=peer.node_id,
            incarnation=peer.incarnation,
            addresses=tuple(interfaces.rank(list(peer.addresses))),
            link_address=session.address,
            outbound=session.outbound,
            since=trio.current_time(),
        )
        self._active[peer.node_id] = session
        self._notify()
        log.info("%s up", session.describe())
        _call("on_peer_up", self._on_peer_up, session.info)
        return None

    def deliver(self, session: Session, message: object) -> None:
        assert session.peer is not None
        _call("on_message", self._on_message, session.peer.node_id, message)

    def session_ended(self, session: Session) -> None:
        """Idempotent: the session may report its end more than once."""
        self._end_handshake(session)
        self._demote(session, session.reason or "link closed")

    # --- internals --------------------------------------------------------------

    def _demote(self, session: Session, reason: str) -> None:
        if not session.promoted or session.demoted:
            return
        session.demoted = True
        assert session.peer is not None
        if self._active.get(session.peer.node_id) is session:
            del self._active[session.peer.node_id]
        self._notify()
        _call("on_peer_down", self._on_peer_down, session.peer.node_id, reason)

    def _end_handshake(self, session: Session) -> None:
        if session.counted_inbound:
            session.counted_inbound = False
            self._pending_inbound -= 1

    def _notify(self) -> None:
        """Wake dialers waiting for the set of linked peers to change."""
        self._changed.set()
        self._changed = trio.Event()

    async def _handle_inbound(self, stream: trio.abc.Stream) -> None:
        remote = _remote_address(stream)
        if self._pending_inbound >= self._max_pending:
            # Unauthenticated connections cost memory; shed load rather than grow.
            self.stats["handshakes_shed"] += 1
            log.warning("shedding inbound connection from %s: too many handshakes", remote)
            await trio.aclose_forcefully(stream)
            return
        if self.secret is None and remote is not None and not interfaces.is_loopback(remote[0]):
            log.warning(
                "refusing link from %s: without a cluster secret links are loopback only", remote[0]
            )
            await trio.aclose_forcefully(stream)
            return
        session = Session(self, stream, outbound=False, address=remote)
        session.counted_inbound = True
        self._pending_inbound += 1
        await session.run()

    async def _dial_loop(self, target: _Target) -> None:
        attempt = 0
        last_error: str | None = None
        while True:
            # Idle while the peer behind this address is linked, whichever way.
            while target.peer_id is not None and target.peer_id in self._active:
                await self._changed.wait()
            if target.last_seen is None:
                target.last_seen = trio.current_time()
            if (
                not target.configured
                and trio.current_time() - target.last_seen > self._forget_after
            ):
                log.info(
                    "forgetting unreachable discovered address %s:%d", target.host, target.port
                )
                del self._targets[(target.host, target.port)]
                return
            stream = await self._connect(target)
            if isinstance(stream, str):
                if stream != last_error:  # log each new kind of failure once
                    log.info("cannot reach %s:%d: %s", target.host, target.port, stream)
                    last_error = stream
            else:
                last_error = None
                session = Session(self, stream, outbound=True, address=(target.host, target.port))
                await session.run()
                if session.is_self:
                    log.info(
                        "%s:%d is this node's own listener; not dialing it",
                        target.host,
                        target.port,
                    )
                    return
                if session.authenticated and session.peer is not None:
                    # Only an authenticated hello may tell us who is behind an address.
                    target.peer_id = session.peer.node_id
                if session.promoted:
                    attempt = 0
                if target.peer_id in self._active:
                    continue  # linked the other way (our dial was the duplicate)
            await trio.sleep(self._backoff(attempt))
            attempt += 1

    async def _connect(self, target: _Target) -> trio.abc.Stream | str:
        """A stream to the target, or why not."""
        with trio.move_on_after(self._connect_timeout):
            try:
                return await self._connector(target.host, target.port)
            except (OSError, trio.BrokenResourceError) as exc:
                return str(exc) or type(exc).__name__
        return f"connect timed out after {self._connect_timeout:g}s"

    def _backoff(self, attempt: int) -> float:
        """Exponential with jitter, so peers that lost each other don't redial in step."""
        delay = min(self._reconnect_max, self._reconnect_min * 2 ** min(attempt, 30))
        return delay * (0.5 + 0.5 * self._rng.random())


def _call(name: str, callback: Callable[..., None], *args: object) -> None:
    try:
        callback(*args)
    except Exception as exc:
        raise CallbackError(f"{name} callback raised {exc!r}") from exc


def _require_loopback(host: str) -> None:
    if not interfaces.is_loopback(host):
        raise InsecureAddressError(
            f"refusing to use {host!r} without a cluster secret: links without a secret "
            "are loopback-only (127.0.0.1, ::1, localhost). Set a cluster secret to link "
            "over the network."
        )


def _bound_port(listeners: Sequence[trio.abc.Listener[Any]], default: int) -> int:
    for listener in listeners:
        if isinstance(listener, trio.SocketListener):
            return int(listener.socket.getsockname()[1])
    return default


def _remote_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    if isinstance(stream, trio.SocketStream):
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return None
        return str(host), int(port)
    return None


def _with_port(address: AdvertisedAddress, port: int) -> AdvertisedAddress:
    kind = address.kind or interfaces.classify(address.host, address.interface)
    return AdvertisedAddress(address.host, address.port or port, address.interface, kind)


def _now() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:  # called before trio.run: the dialer stamps it when it starts
        return None
