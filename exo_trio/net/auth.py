"""The crypto of links and beacons: HMAC-SHA256 only, keyed by the cluster secret.

- Handshake: each side proves it knows the secret with an HMAC over the transcript
  (both Hello messages, which carry both nonces, both node ids and the cluster id),
  labelled with its role so one side's proof can never be replayed as the other's.
- Session: per-direction frame keys derived from the secret and the transcript, so
  they are fresh per link (both nonces) and differ per direction.
- Frames: each tag covers an implicit counter, so replay, reorder and drop all fail.
- Beacons: a separate key derived from the secret, so a beacon tag is never useful
  as a link proof or frame tag.

This gives authentication and integrity, not confidentiality: a passive observer on
the network can read frames. See docs/links.md.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

_LABEL = b"exo-trio/link/v1 "
_COUNTER = struct.Struct(">Q")


def link_key(secret: bytes | None) -> bytes:
    """The key links authenticate with. No secret means the empty key: loopback only."""
    return hmac.digest(secret or b"", _LABEL + b"handshake", "sha256")


def transcript(dialer_hello: bytes, acceptor_hello: bytes) -> bytes:
    """Digest of both raw Hello messages, length-prefixed so the split is unambiguous."""
    h = hashlib.sha256()
    for part in (dialer_hello, acceptor_hello):
        h.update(_COUNTER.pack(len(part)))
        h.update(part)
    return h.digest()


def proof(key: bytes, role: str, digest: bytes) -> bytes:
    """role is "dialer" or "acceptor": the two proofs of one handshake differ."""
    return hmac.digest(key, _LABEL + b"proof " + role.encode() + b" " + digest, "sha256")


def verify_proof(key: bytes, role: str, digest: bytes, candidate: bytes) -> bool:
    return hmac.compare_digest(proof(key, role, digest), candidate)


class FrameMac:
    """Tags or verifies the frames of one direction of one link, in order.

    The counter is implicit: both ends count frames, so it never travels and a frame
    that is replayed, reordered or dropped is tagged for a different counter value.
    """

    def __init__(self, key: bytes) -> None:
        # Keying HMAC costs two compressions; copying a keyed object is cheaper.
        self._template = hmac.new(key, digestmod="sha256")
        self.counter = 0

    def _tag(self, kind: int, body: bytes) -> bytes:
        mac = self._template.copy()
        mac.update(_COUNTER.pack(self.counter))
        mac.update(bytes((kind,)))
        mac.update(body)
        return mac.digest()

    def seal(self, kind: int, body: bytes) -> bytes:
        tag = self._tag(kind, body)
        self.counter += 1
        return tag

    def verify(self, tag: bytes, kind: int, body: bytes) -> bool:
        ok = hmac.compare_digest(self._tag(kind, body), tag)
        if ok:
            self.counter += 1
        return ok


def session_macs(key: bytes, digest: bytes, *, dialer: bool) -> tuple[FrameMac, FrameMac]:
    """(send, receive) frame MACs for this side of the link."""
    session = hmac.digest(key, _LABEL + b"session " + digest, "sha256")
    d2a = FrameMac(hmac.digest(session, b"dialer->acceptor", "sha256"))
    a2d = FrameMac(hmac.digest(session, b"acceptor->dialer", "sha256"))
    return (d2a, a2d) if dialer else (a2d, d2a)


def beacon_key(secret: bytes) -> bytes:
    return hmac.digest(secret, b"exo-trio/discovery/v1 beacon", "sha256")


def beacon_tag(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def verify_beacon_tag(key: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(beacon_tag(key, data), tag)
