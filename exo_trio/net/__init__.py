"""Node-to-node links (authenticated trio-websocket) and LAN discovery.

See docs/links.md for the protocol.
"""

from exo_trio.net.links import CallbackError, InsecureAddressError, PeerInfo, PeerLinks
from exo_trio.net.wire import AdvertisedAddress

__all__ = ["AdvertisedAddress", "CallbackError", "InsecureAddressError", "PeerInfo", "PeerLinks"]
