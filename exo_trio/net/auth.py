"""The crypto of links and beacons, keyed by the cluster secret.

- Handshake (HMAC-SHA256): each side proves it knows the secret with an HMAC over
  the transcript (both Hello messages, which carry both nonces, both node ids and
  the cluster id), labelled with its role so one side's proof can never be replayed
  as the other's.
- Session: per-direction frame keys derived from the secret and the transcript, so
  they are fresh per link (both nonces) and differ per direction.
- Frames (ChaCha20-Poly1305): every frame body is encrypted and authenticated,
  its kind byte authenticated as associated data, under a nonce that is the
  frame's implicit counter; so a process without the secret can neither read a
  frame nor replay, reorder, drop or forge one unnoticed.
- Beacons (HMAC-SHA256): a separate key derived from the secret, so a beacon tag
  is never useful as a link proof or frame key. Beacons are signed, not encrypted:
  they say what any peer may learn (node id, addresses).

See docs/links.md.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

_LABEL = b"exo-trio/link/v2 "
_COUNTER = struct.Struct(">Q")
_NONCE_PAD = bytes(4)  # ChaCha20-Poly1305 nonces are 12 bytes: 4 zero, then the counter


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


class FrameCipher:
    """Seals or opens the frames of one direction of one link, in order.

    The counter is implicit: both ends count frames, so it never travels, and a
    frame that is replayed, reordered or dropped is opened under a different nonce
    and fails. A counter never repeats under one key (keys are fresh per link).
    """

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.counter = 0

    def _nonce(self) -> bytes:
        return _NONCE_PAD + _COUNTER.pack(self.counter)

    def seal(self, kind: int, body: bytes) -> bytes:
        """The body encrypted, followed by its 16-byte tag (over the kind too)."""
        sealed = self._aead.encrypt(self._nonce(), body, bytes((kind,)))
        self.counter += 1
        return sealed

    def open(self, kind: int, sealed: bytes) -> bytes | None:
        """The body, or None if the frame was not sealed by the other end, for this
        kind, at this point of the stream."""
        try:
            body = self._aead.decrypt(self._nonce(), sealed, bytes((kind,)))
        except InvalidTag:
            return None
        self.counter += 1
        return body


def session_ciphers(key: bytes, digest: bytes, *, dialer: bool) -> tuple[FrameCipher, FrameCipher]:
    """(send, receive) frame ciphers for this side of the link."""
    session = hmac.digest(key, _LABEL + b"session " + digest, "sha256")
    d2a = FrameCipher(hmac.digest(session, b"dialer->acceptor", "sha256"))
    a2d = FrameCipher(hmac.digest(session, b"acceptor->dialer", "sha256"))
    return (d2a, a2d) if dialer else (a2d, d2a)


def beacon_key(secret: bytes) -> bytes:
    return hmac.digest(secret, b"exo-trio/discovery/v1 beacon", "sha256")


def beacon_tag(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def verify_beacon_tag(key: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(beacon_tag(key, data), tag)
