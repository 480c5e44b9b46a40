"""The crypto of links and beacons, keyed by the cluster secret.

The link handshake follows the Noise pattern with a pre-shared key (NNpsk): each
side sends an ephemeral X25519 public key in its Hello, and every key of the link
is derived from *both* the secret and the Diffie-Hellman result of the two
ephemeral keys:

    K      = HMAC(secret, "exo-trio/link/v4 psk")
    T      = SHA256 of both raw Hellos (length-prefixed)
    master = HKDF-Extract(salt = T, ikm = K | X25519(e_mine, e_theirs))

- Handshake (HMAC-SHA256 under `master`): each side proves it knows the secret,
  labelled with its role so one side's proof can never be replayed as the other's.
  The proofs depend on the ephemeral exchange, so a passive eavesdropper, who sees
  both public keys but neither private key, learns nothing it could test a guessed
  secret against.
- Session: per-direction frame keys expanded from `master`: fresh per link and per
  direction. Once the ephemeral private keys are gone (they live only for one
  handshake), a leaked secret does not decrypt recorded sessions: forward secrecy.
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
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

_LABEL = b"exo-trio/link/v4 "
_COUNTER = struct.Struct(">Q")
_NONCE_PAD = bytes(4)  # ChaCha20-Poly1305 nonces are 12 bytes: 4 zero, then the counter
EPHEMERAL_BYTES = 32  # an X25519 public key
# Secrets shorter than this are refused unless the node is told otherwise: an
# attacker who can make a node dial it (or sits on its path) gets one proof per
# attempt to test guesses against offline, which only a strong secret withstands.
MIN_SECRET_BYTES = 16


def generate_secret() -> str:
    """A strong cluster secret for `exo-trio secret`: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def link_key(secret: bytes | None) -> bytes:
    """The pre-shared key links authenticate with. No secret means the empty key:
    loopback only."""
    return hmac.digest(secret or b"", _LABEL + b"psk", "sha256")


def transcript(dialer_hello: bytes, acceptor_hello: bytes) -> bytes:
    """Digest of both raw Hello messages, length-prefixed so the split is unambiguous."""
    h = hashlib.sha256()
    for part in (dialer_hello, acceptor_hello):
        h.update(_COUNTER.pack(len(part)))
        h.update(part)
    return h.digest()


class Ephemeral:
    """This side's X25519 key pair for one handshake. The private key comes from
    the caller's randomness (the links' `token_bytes` seam, so the simulator stays
    deterministic) and is dropped with this object after the handshake."""

    def __init__(self, private_bytes: bytes) -> None:
        self._key = X25519PrivateKey.from_private_bytes(private_bytes)
        self.public = self._key.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes | None:
        """The shared secret, or None if the peer's key is malformed or of low order
        (an all-zero result: a key chosen to make the exchange worthless)."""
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            return None


def master_key(key: bytes, shared: bytes, digest: bytes) -> bytes:
    """HKDF-Extract(salt = transcript, ikm = K | DH): unknown unless both the secret
    and one ephemeral private key are known."""
    return hmac.digest(digest, key + shared, "sha256")


def proof(master: bytes, role: str) -> bytes:
    """role is "dialer" or "acceptor": the two proofs of one handshake differ."""
    return hmac.digest(master, _LABEL + b"proof " + role.encode(), "sha256")


def verify_proof(master: bytes, role: str, candidate: bytes) -> bool:
    return hmac.compare_digest(proof(master, role), candidate)


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


def session_ciphers(master: bytes, *, dialer: bool) -> tuple[FrameCipher, FrameCipher]:
    """(send, receive) frame ciphers for this side of the link."""
    d2a = FrameCipher(hmac.digest(master, _LABEL + b"dialer->acceptor", "sha256"))
    a2d = FrameCipher(hmac.digest(master, _LABEL + b"acceptor->dialer", "sha256"))
    return (d2a, a2d) if dialer else (a2d, d2a)


def beacon_key(secret: bytes) -> bytes:
    return hmac.digest(secret, b"exo-trio/discovery/v1 beacon", "sha256")


def beacon_tag(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def verify_beacon_tag(key: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(beacon_tag(key, data), tag)
