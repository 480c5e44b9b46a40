"""LAN discovery: signed UDP multicast beacons that feed PeerLinks.add_peer_address.

Every `interval` seconds (with jitter) a node multicasts a beacon: its cluster id,
node id, incarnation, listen port and addresses, tagged with an HMAC under a key
derived from the cluster secret. A node that receives a valid beacon from another
node of its cluster dials the beacon's source address at the advertised port; the
link handshake then authenticates the peer for real. Beacons without a valid tag
are ignored, and so is a beacon whose source address is not one of the addresses
it advertises (that is a replay from elsewhere).

Discovery is off without a cluster secret (links are loopback-only then) and can be
switched off. The socket layer is a small `BeaconTransport` so tests and the
simulator can replace it; the default is IPv4 multicast with TTL 1.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import msgspec
import trio

from exo_trio.net import auth, wire
from exo_trio.net.wire import AdvertisedAddress, Beacon

log = logging.getLogger("exo_trio.net.discovery")

# Administratively scoped (239/8, RFC 2365): never routed off the site.
DEFAULT_GROUP = "239.255.42.99"
DEFAULT_PORT = 52416


class BeaconTransport(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def receive(self) -> tuple[bytes, tuple[str, int]]: ...
    def close(self) -> None: ...


TransportFactory = Callable[[Sequence[str]], Awaitable[BeaconTransport]]


class DiscoveryTarget(Protocol):
    """The part of PeerLinks discovery uses."""

    node_id: str
    cluster_id: str
    secret: bytes | None
    incarnation: str

    @property
    def listen_port(self) -> int | None: ...
    @property
    def advertised_addresses(self) -> list[AdvertisedAddress]: ...
    def add_peer_address(self, host: str, port: int, node_id: str | None = None) -> bool: ...


def encode_beacon(beacon: Beacon, key: bytes) -> bytes:
    """MAGIC | tag | body, where tag = HMAC(beacon key, MAGIC | body)."""
    body = wire.encode_beacon_body(beacon)
    signed = wire.BEACON_MAGIC + body
    return wire.BEACON_MAGIC + auth.beacon_tag(key, signed) + body


def decode_beacon(data: bytes, key: bytes) -> Beacon | None:
    """The beacon in `data`, or None if it is not a validly signed beacon."""
    magic = wire.BEACON_MAGIC
    header = len(magic) + wire.TAG_BYTES
    if len(data) > wire.MAX_BEACON_BYTES or len(data) < header or not data.startswith(magic):
        return None
    tag, body = data[len(magic) : header], data[header:]
    if not auth.verify_beacon_tag(key, magic + body, tag):
        return None
    try:
        beacon = wire.beacon_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None  # correctly signed but malformed: a newer version, ignore it
    if beacon.version != wire.PROTOCOL_VERSION or not 0 < beacon.listen_port <= 65535:
        return None
    return beacon


class MulticastTransport:
    """IPv4 multicast on the given interface addresses (joins and sends on each, so a
    Thunderbolt bridge and Wi-Fi are both searched)."""

    def __init__(
        self, sock: trio.socket.SocketType, group: str, port: int, interfaces: list[str]
    ) -> None:
        self._sock = sock
        self._group = group
        self._port = port
        self._interfaces = interfaces

    @classmethod
    async def open(
        cls, hosts: Sequence[str], *, group: str = DEFAULT_GROUP, port: int = DEFAULT_PORT
    ) -> MulticastTransport:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Several nodes on one host must all receive the group's datagrams.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(("", port))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            joined = []
            for host in hosts:
                membership = socket.inet_aton(group) + socket.inet_aton(host)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
                except OSError as exc:
                    log.debug("cannot join %s on %s: %s", group, host, exc)
                    continue
                joined.append(host)
            if not joined:
                raise OSError(f"could not join multicast group {group} on {list(hosts)}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, group, port, joined)

    async def send(self, data: bytes) -> None:
        for host in self._interfaces:
            try:
                self._sock.setsockopt(
                    socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(host)
                )
                await self._sock.sendto(data, (self._group, self._port))
            except OSError as exc:  # an interface went away; the others still count
                log.debug("beacon on %s failed: %s", host, exc)

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        data, source = await self._sock.recvfrom(wire.MAX_BEACON_BYTES + 1)
        return data, (str(source[0]), int(source[1]))

    def close(self) -> None:
        self._sock.close()


class Discovery:
    """Beacons this node's links and adds discovered peers to them.

    Start it after `links.run` has started (it needs the bound port). `run` returns
    at once, having logged why, if discovery is off (enabled=False, or no secret) or
    multicast is unavailable; it never takes the node down.
    """

    def __init__(
        self,
        links: DiscoveryTarget,
        *,
        enabled: bool = True,
        interval: float = 2.0,
        group: str = DEFAULT_GROUP,
        port: int = DEFAULT_PORT,
        transport: TransportFactory | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._links = links
        self.enabled = enabled and links.secret is not None
        self._why_off = (
            "switched off"
            if not enabled
            else "no cluster secret (links are loopback only)"
            if links.secret is None
            else ""
        )
        self._key = auth.beacon_key(links.secret) if links.secret is not None else b""
        self._interval = interval
        self._group = group
        self._port = port
        self._transport = transport
        self._rng = rng if rng is not None else random.Random()
        self._rejected_sources: set[str] = set()
        self.stats = {"sent": 0, "received": 0, "rejected": 0, "added": 0}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            log.info("discovery off: %s", self._why_off)
            task_status.started()
            return
        try:
            transport = await self._open_transport()
        except OSError as exc:
            log.warning("discovery unavailable (use --peer instead): %s", exc)
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, transport)
                task_status.started()
                await self._beacon_loop(transport)
        finally:
            transport.close()

    def beacon_packet(self) -> bytes | None:
        """This node's signed beacon, or None before the links listen."""
        port = self._links.listen_port
        if port is None:
            return None
        addresses = self._links.advertised_addresses
        while True:
            beacon = Beacon(
                version=wire.PROTOCOL_VERSION,
                cluster_id=self._links.cluster_id,
                node_id=self._links.node_id,
                incarnation=self._links.incarnation,
                listen_port=port,
                addresses=addresses,
            )
            packet = encode_beacon(beacon, self._key)
            if len(packet) <= wire.MAX_BEACON_BYTES or not addresses:
                return packet
            addresses = addresses[:-1]  # ranked best first: drop the least useful

    def handle_datagram(self, data: bytes, source: tuple[str, int]) -> bool:
        """Act on one received datagram; True if it added a new peer address."""
        self.stats["received"] += 1
        beacon = decode_beacon(data, self._key)
        host = source[0]
        if beacon is None:
            self.stats["rejected"] += 1
            if host not in self._rejected_sources:  # say it once per source, not per beacon
                self._rejected_sources.add(host)
                log.info("ignoring unauthenticated beacons from %s (wrong secret?)", host)
            return False
        if beacon.node_id == self._links.node_id or beacon.cluster_id != self._links.cluster_id:
            return False
        if host not in {a.host for a in beacon.addresses}:
            self.stats["rejected"] += 1
            log.debug(
                "beacon of %s from %s, which it does not advertise: replay?", beacon.node_id, host
            )
            return False
        added = self._links.add_peer_address(host, beacon.listen_port, beacon.node_id)
        if added:
            self.stats["added"] += 1
            log.info("discovered %s at %s:%d", beacon.node_id, host, beacon.listen_port)
        return added

    async def _open_transport(self) -> BeaconTransport:
        advertised = self._links.advertised_addresses
        # Beacons are IPv4 multicast: IPv6 addresses are advertised, not joined.
        advertised = [a for a in advertised if ":" not in a.host]
        hosts = [a.host for a in advertised if a.kind != "loopback"]
        hosts = hosts or [a.host for a in advertised] or ["127.0.0.1"]
        if self._transport is not None:
            return await self._transport(hosts)
        return await MulticastTransport.open(hosts, group=self._group, port=self._port)

    async def _beacon_loop(self, transport: BeaconTransport) -> None:
        while True:
            packet = self.beacon_packet()
            if packet is not None:
                await transport.send(packet)
                self.stats["sent"] += 1
            # Jitter so nodes started together don't beacon in lockstep.
            await trio.sleep(self._interval * (0.75 + 0.5 * self._rng.random()))

    async def _receive_loop(self, transport: BeaconTransport) -> None:
        while True:
            try:
                data, source = await transport.receive()
            except OSError as exc:
                log.debug("beacon receive failed: %s", exc)
                await trio.sleep(self._interval)
                continue
            self.handle_datagram(data, source)
