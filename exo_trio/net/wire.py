"""What goes on the wire between nodes: handshake structs, data frames, beacons.

Every link is one websocket. Each websocket binary message is either a handshake
message (msgpack of a tagged struct below, only before the link is authenticated)
or, afterwards, one data frame:

    kind (1 byte) | body, encrypted | tag (16 bytes, Poly1305)

The body is encrypted with ChaCha20-Poly1305 under a per-direction key and an
implicit per-direction counter as nonce; the tag covers the kind too (see
`auth.FrameCipher`). So the counter never travels, and a replayed, reordered,
dropped or altered frame fails to open. The protocol is described in
docs/links.md.
"""

from __future__ import annotations

import math
import struct

import msgspec

# 2: encrypted data frames (ChaCha20-Poly1305); 3: a message frame carries a batch;
# 4: ephemeral X25519 keys in the Hellos (forward secrecy), the dialer proves first
PROTOCOL_VERSION = 4
# The websocket resource a link asks for; anything else is refused before auth.
LINK_RESOURCE = "/exo-trio/link/v2"

NONCE_BYTES = 32
EPHEMERAL_BYTES = 32  # an X25519 public key
TAG_BYTES = 32  # HMAC-SHA256: handshake proofs and beacon tags
FRAME_TAG_BYTES = 16  # Poly1305: data frames
MAX_NODE_ID = 128
MAX_ADDRESSES = 64
# The cap on one app message. 16 MiB is far above any control message (activations
# go through mx.distributed, not these links); bigger is corruption.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A message frame carries every message that was waiting in the outbox, up to this
# many bytes (one bigger message goes alone): one websocket message, one seal and
# one wake-up of the peer's reader per runner step, not one per request.
BATCH_BYTES = 256 * 1024
# msgpack's array header in front of a batch: at most 5 bytes (0xdd + u32 count).
BATCH_HEADER_BYTES = 5

# Data frame kinds (after the handshake).
KIND_MESSAGE = 0  # body: msgpack array of the caller's messages, in send order
KIND_HEARTBEAT = 1  # body: empty, or a ping/pong (below); when idle, and to measure latency
KIND_ACTIVATE = 2  # body: empty; the deciding side (smaller node id) keeps this link
KIND_READY = 3  # body: empty; dialer to deciding acceptor: "your proof checked out"
FRAME_OVERHEAD = 1 + FRAME_TAG_BYTES
# Bytes a peer may send before it has proved the secret: the HTTP upgrade, a Hello
# and a Proof fit many times over. Caps what an unauthenticated peer can make us hold.
MAX_PREAUTH_BYTES = 64 * 1024

# Websocket close codes (4000-4999 are for applications). The peer logs the reason.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 4000
CLOSE_AUTH = 4001
CLOSE_DUPLICATE = 4002
CLOSE_BAD_MAC = 4003
CLOSE_TIMEOUT = 4004
CLOSE_SELF = 4006
CLOSE_CLUSTER = 4007
CLOSE_REPLACED = 4008


class AdvertisedAddress(msgspec.Struct, frozen=True):
    """One address a node listens on, so peers can pick the fastest path to it.

    kind is a cheap guess from the address and interface name: "thunderbolt",
    "link-local" (169.254/16, what Thunderbolt bridges self-assign), "private",
    "public" or "loopback". interface is the OS interface name ("" if unknown).
    """

    host: str
    port: int
    interface: str = ""
    kind: str = ""


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Who I am. The dialer sends it first; the acceptor answers with its own.

    Both raw encodings go into the transcript that the proofs and session keys are
    derived from, so every field here is authenticated once the proofs check out.
    `ephemeral` is this handshake's X25519 public key (auth.Ephemeral); its default
    lets a Hello of an older version decode, so the version check can name it.
    """

    version: int
    cluster_id: str
    node_id: str
    # Random per process start: tells a restarted peer from a duplicate link.
    incarnation: str
    nonce: bytes
    listen_port: int
    addresses: list[AdvertisedAddress]
    ephemeral: bytes = b""


class Proof(msgspec.Struct, tag="proof", frozen=True):
    """HMAC proving knowledge of the cluster secret, keyed by the handshake's master
    key (secret, transcript and ephemeral exchange) and bound to a role."""

    proof: bytes


HandshakeMessage = Hello | Proof
handshake_decoder = msgspec.msgpack.Decoder(HandshakeMessage)
_encoder = msgspec.msgpack.Encoder()


def encode_handshake(message: Hello | Proof) -> bytes:
    return _encoder.encode(message)


def check_hello(hello: Hello) -> str | None:
    """Why a decoded Hello is malformed, or None. Called before anything trusts it."""
    if hello.version != PROTOCOL_VERSION:
        return f"unsupported protocol version {hello.version} (we speak {PROTOCOL_VERSION})"
    if not hello.node_id or len(hello.node_id) > MAX_NODE_ID:
        return "bad node id"
    if len(hello.nonce) != NONCE_BYTES:
        return "bad nonce length"
    if len(hello.ephemeral) != EPHEMERAL_BYTES:
        return "bad ephemeral key length"
    if len(hello.addresses) > MAX_ADDRESSES or not 0 <= hello.listen_port <= 65535:
        return "bad address list"
    return None


_batch_encoder = msgspec.msgpack.Encoder()


def pack_batch(payloads: list[bytes]) -> bytes:
    """A message frame's body: the already-encoded messages as one msgpack array
    (decoded by a `Decoder(list[MessageType])` on the other side)."""
    return _batch_encoder.encode([msgspec.Raw(p) for p in payloads])


# A heartbeat's body may carry a latency probe: three big-endian float64s, (ping,
# echo, hold). `ping` is the sender's clock when it sent the frame, or NaN; `echo` a
# ping received from the peer, and `hold` the seconds it was held before this
# frame went out (so an answer may wait for the next frame the writer sends
# anyway: the round trip is `now - echo - hold`), or NaN. An empty body, or one of
# any other length, probes nothing (older peers send empty ones and ignore bodies).
_PROBE = struct.Struct("!ddd")
NO_STAMP = math.nan


def pack_probe(ping: float, echo: float, hold: float) -> bytes:
    return _PROBE.pack(ping, echo, hold)


def unpack_probe(body: bytes) -> tuple[float, float, float] | None:
    """(ping, echo, hold) from a heartbeat's body, or None if it carries no probe."""
    if len(body) != _PROBE.size:
        return None
    return _PROBE.unpack(body)


def pack_frame(kind: int, sealed: bytes) -> bytes:
    """A data frame: the kind, then the sealed body (auth.FrameCipher.seal)."""
    return bytes((kind,)) + sealed


def unpack_frame(data: bytes) -> tuple[int, bytes] | None:
    """Split a data frame into (kind, sealed body); None if too short to be one."""
    if len(data) < FRAME_OVERHEAD:
        return None
    return data[0], data[1:]


# --- discovery beacons -------------------------------------------------------------

BEACON_MAGIC = b"EXOTRIO-BEACON/1"
# Fits one unfragmented UDP datagram on any LAN.
MAX_BEACON_BYTES = 1400


class Beacon(msgspec.Struct, tag="beacon", frozen=True):
    """Multicast on the LAN: 'a node of this cluster listens here'."""

    version: int
    cluster_id: str
    node_id: str
    incarnation: str
    listen_port: int
    addresses: list[AdvertisedAddress]


beacon_decoder = msgspec.msgpack.Decoder(Beacon)


def encode_beacon_body(beacon: Beacon) -> bytes:
    return _encoder.encode(beacon)
