"""What a node reports about itself for people to look at: its memory, its
addresses, and its links with their kind and latency (NodeFacts). The leader puts
every node's facts in its view, so any node's /state and event stream show the
whole cluster, links between other nodes included."""

from __future__ import annotations

from typing import Any

from exo_trio.cluster_messages import LinkReport, NodeFacts
from exo_trio.net import interfaces
from exo_trio.net.links import PeerInfo, PeerLinks


def link_report(info: PeerInfo, rtt: float | None) -> LinkReport:
    """The link's kind: the peer's own word for the address the link runs over (it
    knows the interface, e.g. a Thunderbolt bridge), else a guess from the address."""
    host = info.link_address[0] if info.link_address is not None else ""
    kind = next((a.kind for a in info.addresses if a.host == host and a.kind), "")
    return LinkReport(peer=info.node_id, host=host, kind=kind or interfaces.classify(host), rtt=rtt)


def node_facts(links: PeerLinks[Any], memory_total: int) -> NodeFacts:
    peers = links.peers()
    return NodeFacts(
        memory_total=memory_total,
        addresses=tuple(links.advertised_addresses),
        links=tuple(link_report(info, links.rtt(peer)) for peer, info in sorted(peers.items())),
    )
