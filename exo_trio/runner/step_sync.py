"""Keeping the ranks of a sharded runner in lockstep, over a TCP side channel.

Every rank runs its own BatchGenerator over its share of the model, and every
forward pass is a collective: if two ranks ever disagreed on which sequences are
in the batch, their collectives would mismatch and the group would hang or
compute garbage. So before every step rank 0 (the coordinator, the only rank that
receives commands) tells every rank which commands to apply at that step, and
whether to stop; all ranks then apply the same commands in the same order and
run the same step.

Why not an MLX collective: MLX's ring backend busy-waits. A rank waiting in a
collective for rank 0's next order spins a core at 100% for as long as rank 0 is
idle, which on a shared machine starves everything else (the node processes, the
other ranks, the clients). A plain blocking socket sleeps in the kernel instead,
so an idle instance costs nothing, and the MLX collectives run only inside the
forward pass, where they carry activations.

The channel: rank 0 listens on an ephemeral port on its own address from the
hostfile (the address the other ranks already reach it on) and hands the port,
with a random token, to the other ranks in one `all_sum` right after the group
forms. Every other rank connects and introduces itself (`Hello`, rank and token:
a stray connection cannot take a rank's place). Frames are framing.py's
length-prefixed msgpack.

One exchange (rank 0 runs one per step, and one per second while idle, as a
heartbeat):

1. rank 0 sends every rank `Orders(seq, stop, commands)`;
2. every rank applies them, runs its step if it has work, and answers
   `Report(seq, digest)`: a digest of the generation events that step produced;
3. rank 0 does the same, then waits for every report before it emits anything.

Equal digests prove the ranks sampled the same tokens. A rank that produced
different ones (e.g. ranks on different hardware computing slightly different
logits) is reported as an error rather than left to wedge the group later. A
report that never comes means a rank is gone: its socket ends (EOF, reset) or
stays silent past the stall timeout. Either way rank 0 emits none of that step's
events, so no token is ever emitted that was computed from a broken collective
(a collective that loses its peer while queued asynchronously does not always
raise: it can leave garbage behind, which the other rank would not agree with).

Waiting for the reports costs little: the other ranks report right after their
step, which ends with the same collectives as rank 0's, and (unless the runner
waits for each forward pass, see rank._sync_steps) BatchGenerator has
already queued the next forward pass, so the round trip overlaps with it.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from exo_trio.runner.framing import FrameDecoder, FrameError, encode_frame
from exo_trio.types import Cancel, GenerationEvent, TextGeneration

if TYPE_CHECKING:
    import mlx.core as mx

    from exo_trio.runner.layer_split import ShardSpec

__all__ = [
    "FollowerChannel",
    "GroupStalled",
    "LeaderChannel",
    "Orders",
    "PeerLost",
    "Report",
    "StepCommand",
    "StepSyncError",
    "events_digest",
    "open_channel",
    "rank0_host",
]

StepCommand = TextGeneration | Cancel

_DIGEST_MASK = 0x7FFFFFFF
_TOKEN_BITS = 31  # the token travels as int32 words of an all_sum
_READ_SIZE = 65536
_HELLO_SECONDS = 2.0


class StepSyncError(RuntimeError):
    """The ranks can no longer be trusted to agree: they produced different tokens,
    or a peer broke the channel's protocol."""


class PeerLost(StepSyncError):
    """A peer's end of the channel closed or failed: the process is gone, or the
    link between the ranks broke with a reset."""


class GroupStalled(StepSyncError):
    """A peer stayed silent past the stall timeout (frozen, or a link cut without a
    reset). The message is complete (it says "stalled"); callers use it as is."""


# -- messages ---------------------------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """A rank > 0 introducing itself to rank 0, once, right after connecting."""

    rank: int
    token: int


class Orders(msgspec.Struct, frozen=True, tag="orders"):
    """What every rank does at this exchange (rank 0 to the others)."""

    seq: int
    stop: bool
    commands: list[StepCommand]


class Report(msgspec.Struct, frozen=True, tag="report"):
    """A rank > 0 has applied `seq`'s orders and run its step (if it had work)."""

    seq: int
    digest: int


def events_digest(events: Sequence[GenerationEvent]) -> int:
    """A digest of one step's generation events, equal on ranks that agree."""
    if not events:
        return 0
    return zlib.crc32(_ENCODER.encode(list(events))) & _DIGEST_MASK


_ENCODER = msgspec.msgpack.Encoder()


# -- one socket -------------------------------------------------------------------------


class _Peer:
    """A blocking socket carrying frames, with a deadline on every wait."""

    def __init__(self, sock: socket.socket, rank: int, message_type: type) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Frames are small and each one is waited for: never hold one back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.rank = rank  # the rank at the other end
        self._decoder: FrameDecoder[object] = FrameDecoder(message_type)
        self._queued: list[object] = []

    def send(self, data: bytes, timeout: float, doing: str) -> None:
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            what = f"{doing} (rank {self.rank} reads nothing)"
            raise GroupStalled(_stalled(timeout, what)) from None
        except OSError as exc:
            raise PeerLost(f"lost contact with rank {self.rank}: {exc}") from exc

    def receive(self, timeout: float, doing: str) -> object:
        """The next message; PeerLost on EOF or error, GroupStalled after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self._queued:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GroupStalled(_stalled(timeout, doing))
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(_READ_SIZE)
            except TimeoutError:
                raise GroupStalled(_stalled(timeout, doing)) from None
            except OSError as exc:
                raise PeerLost(f"lost contact with rank {self.rank}: {exc}") from exc
            if not data:
                raise PeerLost(f"rank {self.rank} closed the step channel (its process ended)")
            try:
                self._queued.extend(self._decoder.feed(data))
            except FrameError as exc:
                raise StepSyncError(f"garbled step channel from rank {self.rank}: {exc}") from exc
        return self._queued.pop(0)

    def wait_closed(self, timeout: float) -> None:
        """Read until the peer closes its end (or `timeout`), ignoring what comes."""
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                if not self.sock.recv(_READ_SIZE):
                    return
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()


def _stalled(seconds: float, doing: str) -> str:
    return (
        f"distributed group stalled: no progress for {seconds:.0f}s while {doing} "
        "(a peer is stuck or unreachable)"
    )


# -- the two ends -----------------------------------------------------------------------


class LeaderChannel:
    """Rank 0's end: orders out to every other rank, reports back."""

    def __init__(self, peers: list[_Peer], stall_timeout: float) -> None:
        self._peers = sorted(peers, key=lambda p: p.rank)
        self.stall_timeout = stall_timeout
        self._seq = 0
        # For reporting the cost of keeping the ranks in step.
        self.exchanges = 0
        self.command_exchanges = 0
        self.wait_seconds = 0.0  # spent waiting for reports after rank 0's own step

    def send_orders(self, *, stop: bool = False, commands: Sequence[StepCommand] = ()) -> int:
        """Start an exchange: every rank applies `commands` (and stops if `stop`).
        Returns the exchange's number, for `confirm`."""
        self._seq += 1
        frame = encode_frame(Orders(seq=self._seq, stop=stop, commands=list(commands)))
        for peer in self._peers:
            peer.send(frame, self.stall_timeout, "sending step orders")
        self.exchanges += 1
        self.command_exchanges += bool(commands)
        return self._seq

    def confirm(self, seq: int, digest: int) -> None:
        """Finish exchange `seq` (every exchange is confirmed, in order): wait until
        every rank reports its step, and check that each produced the same events as
        rank 0 (`digest`)."""
        started = time.perf_counter()
        for peer in self._peers:
            message = peer.receive(self.stall_timeout, f"waiting for rank {peer.rank}'s step")
            if not isinstance(message, Report) or message.seq != seq:
                raise StepSyncError(f"rank {peer.rank} answered exchange {seq} with {message!r}")
            if message.digest != digest & _DIGEST_MASK:
                raise StepSyncError(
                    f"ranks of the instance produced different tokens at exchange {seq} "
                    f"(digest {digest & _DIGEST_MASK} on rank 0, {message.digest} on rank "
                    f"{peer.rank})"
                )
        self.wait_seconds += time.perf_counter() - started

    def close(self, linger: float) -> None:
        """After a stop: give the other ranks up to `linger` seconds to leave first,
        so that none of them sees rank 0 vanish before it has read the stop."""
        deadline = time.monotonic() + linger
        for peer in self._peers:
            peer.wait_closed(max(0.0, deadline - time.monotonic()))
            peer.close()


class FollowerChannel:
    """The end of a rank > 0: orders in, reports out."""

    def __init__(self, peer: _Peer, rank: int) -> None:
        self._peer = peer
        self.rank = rank
        self._expected = 1

    def receive(self, timeout: float) -> Orders:
        """Block (asleep in the kernel, no CPU) until rank 0's next orders."""
        message = self._peer.receive(timeout, "waiting for orders from rank 0")
        if not isinstance(message, Orders) or message.seq != self._expected:
            raise StepSyncError(f"rank 0 sent {message!r}, expected orders {self._expected}")
        self._expected += 1
        return message

    def report(self, seq: int, digest: int, timeout: float) -> None:
        frame = encode_frame(Report(seq=seq, digest=digest & _DIGEST_MASK))
        self._peer.send(frame, timeout, "reporting a step to rank 0")

    def close(self) -> None:
        self._peer.close()


# -- forming the channel ----------------------------------------------------------------


def rank0_host(spec: ShardSpec) -> str:
    """Rank 0's address as the other ranks know it: the ring hostfile's first entry
    for rank 0, or the JACCL coordinator's host."""
    if spec.backend == "ring":
        if spec.hostfile is None:
            raise StepSyncError("the ring backend needs a hostfile")
        address = json.loads(Path(spec.hostfile).read_text())[0][0]
    elif spec.jaccl_coordinator is not None:
        address = spec.jaccl_coordinator
    else:
        raise StepSyncError(f"no address for rank 0 with the {spec.backend} backend")
    host, _, _port = str(address).rpartition(":")
    return host.strip("[]")


def open_channel(
    group: mx.distributed.Group, spec: ShardSpec, timeout: float, stall_timeout: float
) -> LeaderChannel | FollowerChannel:
    """Form the side channel of a group that has just formed; every rank calls this,
    once, in the same place (it runs one collective: the all_sum that hands out the
    port). Raises StepSyncError if the channel cannot be formed within `timeout`."""
    import mlx.core as mx
    import numpy as np

    rank, size = group.rank(), group.size()
    host = rank0_host(spec)
    listener: socket.socket | None = None
    words = [0, 0]
    if rank == 0:
        family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.bind(address)
        listener.listen(size)
        words = [listener.getsockname()[1], secrets.randbits(_TOKEN_BITS)]
    try:
        summed = mx.distributed.all_sum(mx.array(words, dtype=mx.int32), group=group, stream=mx.cpu)
        port, token = (int(w) for w in np.array(summed))
        deadline = time.monotonic() + timeout
        if listener is not None:
            return LeaderChannel(_accept(listener, size, token, deadline), stall_timeout)
        return FollowerChannel(_connect(host, port, rank, token, deadline), rank)
    finally:
        if listener is not None:
            listener.close()


def _accept(listener: socket.socket, size: int, token: int, deadline: float) -> list[_Peer]:
    peers: dict[int, _Peer] = {}
    while len(peers) < size - 1:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(1, size)) - set(peers))
            raise StepSyncError(f"rank(s) {missing} did not join the step channel")
        listener.settimeout(remaining)
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        peer = _Peer(sock, -1, Hello | Report)
        try:
            # A rank says hello as soon as it connects; a silent stranger must not
            # hold up the ranks queued behind it for long.
            wait = min(_HELLO_SECONDS, max(0.1, deadline - time.monotonic()))
            hello = peer.receive(wait, "waiting for a hello")
        except StepSyncError:
            peer.close()
            continue
        # Anything but a rank we still wait for, with the right token, is turned away.
        if (
            not isinstance(hello, Hello)
            or hello.token != token
            or not 0 < hello.rank < size
            or hello.rank in peers
        ):
            peer.close()
            continue
        peer.rank = hello.rank
        peers[hello.rank] = peer
    return list(peers.values())


def _connect(host: str, port: int, rank: int, token: int, deadline: float) -> _Peer:
    while True:
        remaining = deadline - time.monotonic()
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, remaining))
            break
        except OSError as exc:
            if remaining <= 0:
                raise StepSyncError(f"cannot reach rank 0's step channel: {exc}") from exc
            time.sleep(0.05)  # rank 0 listens before the all_sum: this is rare
    peer = _Peer(sock, 0, Orders)
    peer.send(encode_frame(Hello(rank=rank, token=token)), max(0.1, remaining), "saying hello")
    return peer
