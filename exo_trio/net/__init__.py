"""Node-to-node links (authenticated trio-websocket) and LAN discovery.

See docs/links.md for the protocol.
"""

from exo_trio.net.discovery import Discovery
from exo_trio.net.links import CallbackError, InsecureAddressError, PeerInfo, PeerLinks
from exo_trio.net.wire import AdvertisedAddress

__all__ = [
    "AdvertisedAddress",
    "CallbackError",
    "Discovery",
    "InsecureAddressError",
    "PeerInfo",
    "PeerLinks",
]
