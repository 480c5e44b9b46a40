"""The addresses a node advertises, and which ones count as loopback.

Interfaces and their addresses come from psutil (Linux and macOS): every IPv4 and
IPv6 address of every interface that is up, IPv6 link-local ones included, since
a Thunderbolt bridge often has nothing else. Anything that fails is skipped, and
the caller can always pass explicit addresses instead.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import psutil

from exo_trio.net.wire import AdvertisedAddress

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
# Preferred first: a Thunderbolt bridge beats Ethernet/Wi-Fi; loopback only for
# peers on the same host, which will find it through "private"/"public" anyway.
_RANK = {"thunderbolt": 0, "link-local": 1, "private": 2, "public": 3, "loopback": 4}


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP literals. Other names are not resolved:
    a secret-less node must not be talked into a non-loopback link by DNS."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def classify(host: str, interface: str = "") -> str:
    name = interface.lower()
    if name.startswith("thunderbolt") or (sys.platform == "darwin" and name.startswith("bridge")):
        # macOS names its Thunderbolt Bridge service bridgeN; Linux thunderbolt-net
        # uses thunderboltN.
        return "thunderbolt"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "public" if not is_loopback(host) else "loopback"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private:
        return "private"
    return "public"


def interface_addresses() -> list[tuple[str, str]]:
    """(interface name, address) for every IPv4 and IPv6 address of every interface
    that is up, IPv4 first. IPv6 addresses come without their `%scope` suffix (the
    scope is the interface, named beside it)."""
    try:
        entries = psutil.net_if_addrs()
        stats = psutil.net_if_stats()
    except OSError:
        return []
    found: list[tuple[str, str]] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for name, addresses in entries.items():
            if name in stats and not stats[name].isup:
                continue
            for address in addresses:
                if address.family == family:
                    found.append((name, address.address.split("%")[0]))
    return found


def advertised_addresses(listen_host: str, port: int) -> list[AdvertisedAddress]:
    """What to tell peers: every interface address when listening on a wildcard,
    else the one listen address (with its interface name when it is found)."""
    interfaces = interface_addresses()
    if listen_host in WILDCARD_HOSTS:
        pairs = interfaces or [("", "127.0.0.1")]
    else:
        names = {addr: name for name, addr in interfaces}
        pairs = [(names.get(listen_host, ""), listen_host)]
    return rank([AdvertisedAddress(addr, port, name, classify(addr, name)) for name, addr in pairs])


def rank(addresses: list[AdvertisedAddress]) -> list[AdvertisedAddress]:
    """Order addresses by how fast the link probably is (a heuristic: Thunderbolt and
    link-local first, loopback last). Stable for equal kinds."""
    return sorted(addresses, key=lambda a: _RANK.get(a.kind, len(_RANK)))
