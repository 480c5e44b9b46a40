"""LAN discovery: signed beacons, their handling, and discovery driving real links."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from exo_trio.net import auth, wire
from exo_trio.net.discovery import Discovery, MulticastTransport, decode_beacon, encode_beacon
from exo_trio.net.wire import AdvertisedAddress, Beacon
from tests.test_links import SECRET, MemoryNetwork, Node, eventually, memory_node

KEY = auth.beacon_key(SECRET)


def beacon(node_id: str = "b", host: str = "10.0.0.2", **overrides: object) -> Beacon:
    fields: dict[str, object] = {
        "version": wire.PROTOCOL_VERSION,
        "cluster_id": "test-cluster",
        "node_id": node_id,
        "incarnation": "1234",
        "listen_port": 7000,
        "addresses": [AdvertisedAddress(host, 7000, "en0", "private")],
    }
    fields.update(overrides)
    return Beacon(**fields)  # type: ignore[arg-type]


class FakeLinks:
    """The slice of PeerLinks that discovery uses."""

    def __init__(self, node_id: str = "a", secret: bytes | None = SECRET) -> None:
        self.node_id = node_id
        self.cluster_id = "test-cluster"
        self.secret = secret
        self.incarnation = "5678"
        self.listen_port: int | None = 7001
        self.advertised_addresses = [AdvertisedAddress("10.0.0.1", 7001, "en0", "private")]
        self.added: list[tuple[str, int, str | None]] = []

    def add_peer_address(self, host: str, port: int, node_id: str | None = None) -> bool:
        new = (host, port, node_id) not in self.added
        self.added.append((host, port, node_id))
        return new


def test_beacons_round_trip_and_every_forgery_is_rejected() -> None:
    original = beacon()
    packet = encode_beacon(original, KEY)
    assert packet.startswith(wire.BEACON_MAGIC) and len(packet) < wire.MAX_BEACON_BYTES
    assert decode_beacon(packet, KEY) == original
    assert decode_beacon(packet, auth.beacon_key(b"another secret")) is None
    for i in range(len(packet)):  # any flipped byte anywhere: rejected
        assert decode_beacon(packet[:i] + bytes([packet[i] ^ 0x80]) + packet[i + 1 :], KEY) is None
    assert decode_beacon(b"", KEY) is None
    assert decode_beacon(packet[:-1], KEY) is None
    assert decode_beacon(packet + b"x" * wire.MAX_BEACON_BYTES, KEY) is None
    # A beacon key is not a link key: a beacon tag proves nothing to a link.
    assert auth.beacon_key(SECRET) != auth.link_key(SECRET)
    # Correctly signed, but a protocol version we do not speak: ignored.
    assert decode_beacon(encode_beacon(beacon(version=99), KEY), KEY) is None


def test_handling_adds_only_authentic_beacons_of_other_nodes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exo_trio.net")
    links = FakeLinks()
    discovery = Discovery(links)
    assert discovery.handle_datagram(encode_beacon(beacon(), KEY), ("10.0.0.2", 52416))
    assert links.added == [("10.0.0.2", 7000, "b")]
    # Again: refreshed (so the address is not forgotten), but not new.
    assert not discovery.handle_datagram(encode_beacon(beacon(), KEY), ("10.0.0.2", 52416))

    own = discovery.beacon_packet()
    assert own is not None and not discovery.handle_datagram(own, ("10.0.0.1", 52416))
    other_cluster = encode_beacon(beacon(cluster_id="other"), KEY)
    assert not discovery.handle_datagram(other_cluster, ("10.0.0.2", 52416))
    # A genuine beacon replayed from an address it does not advertise.
    assert not discovery.handle_datagram(encode_beacon(beacon(), KEY), ("10.9.9.9", 52416))
    forged = encode_beacon(beacon("evil", "10.0.0.66"), auth.beacon_key(b"guess"))
    for _ in range(3):
        assert not discovery.handle_datagram(forged, ("10.0.0.66", 52416))
    assert [a[2] for a in links.added] == ["b", "b"]
    assert discovery.stats["rejected"] == 4
    assert caplog.text.count("ignoring unauthenticated beacons from 10.0.0.66") == 1


def test_beacon_drops_addresses_to_fit_a_datagram() -> None:
    links = FakeLinks()
    links.advertised_addresses = [
        AdvertisedAddress(f"10.0.{i}.1", 7001, f"interface-with-a-long-name-{i}", "private")
        for i in range(60)
    ]
    packet = Discovery(links).beacon_packet()
    assert packet is not None and len(packet) <= wire.MAX_BEACON_BYTES
    decoded = decode_beacon(packet, KEY)
    assert decoded is not None and decoded.addresses[0].host == "10.0.0.1"
    links.listen_port = None
    assert Discovery(links).beacon_packet() is None  # nothing to announce yet


@pytest.mark.parametrize(("secret", "enabled"), [(None, True), (SECRET, False)])
async def test_discovery_is_off_without_a_secret_or_when_disabled(
    secret: bytes | None, enabled: bool
) -> None:
    async def no_transport(hosts: Sequence[str]) -> MulticastTransport:
        raise AssertionError("discovery must not open a socket when it is off")

    discovery = Discovery(FakeLinks(secret=secret), enabled=enabled, transport=no_transport)
    assert not discovery.enabled
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)  # returns at once


class Hub:
    """An in-memory multicast group: every member receives every beacon, its own too."""

    def __init__(self) -> None:
        self.members: list[HubTransport] = []

    async def join(self, hosts: Sequence[str]) -> HubTransport:
        member = HubTransport(self, hosts[0])
        self.members.append(member)
        return member


class HubTransport:
    def __init__(self, hub: Hub, host: str) -> None:
        self.hub = hub
        self.host = host
        self.send_channel, self.receive_channel = trio.open_memory_channel[
            tuple[bytes, tuple[str, int]]
        ](64)

    async def send(self, data: bytes) -> None:
        for member in self.hub.members:
            member.send_channel.send_nowait((data, (self.host, 52416)))

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        return await self.receive_channel.receive()

    def close(self) -> None:
        self.hub.members.remove(self)


async def test_nodes_find_each_other_without_peers_under_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, hub = MemoryNetwork(), Hub()
    async with trio.open_nursery() as nursery:
        nodes = [
            await memory_node(net, name, port, [], seed=port).start(nursery)
            for name, port in [("a", 1), ("b", 2), ("c", 3)]
        ]
        for node in nodes:
            discovery = Discovery(node.links, transport=hub.join, rng=random.Random(node.port))
            await nursery.start(discovery.run)
        await eventually(lambda: all(len(n.links.peers()) == 2 for n in nodes), limit=30)
        assert all(not n.downs for n in nodes)
        nursery.cancel_scope.cancel()


async def test_real_multicast_on_loopback(nursery: trio.Nursery) -> None:
    port = random.Random().randrange(40000, 60000)
    try:
        probe = await MulticastTransport.open(["127.0.0.1"], port=port)
    except OSError as exc:
        pytest.skip(f"no multicast on loopback here: {exc}")
    probe.close()
    a = await Node("a").start(nursery)
    b = await Node("b").start(nursery)
    for node in (a, b):
        discovery = Discovery(node.links, port=port, interval=0.1)
        await nursery.start(discovery.run)
    await eventually(lambda: a.linked(b) and b.linked(a))
