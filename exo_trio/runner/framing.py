"""Length-prefixed msgpack frames over a byte stream.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
The reader is incremental (a `FrameDecoder` fed arbitrary byte slices) so that it
works the same over a pipe, a socket or a simulated stream that splits writes at
random points.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

import msgspec
import trio

T = TypeVar("T")

HEADER = struct.Struct(">I")
# A frame is at most one command: a prompt of a few hundred thousand token ids at
# most. Anything bigger is a corrupt or hostile stream, not a message.
MAX_FRAME = 64 * 1024 * 1024


class FrameError(Exception):
    """The byte stream is not a valid sequence of frames."""


def encode_frame(message: object) -> bytes:
    payload = msgspec.msgpack.encode(message)
    return HEADER.pack(len(payload)) + payload


class FrameDecoder(Generic[T]):
    """Turns byte slices into decoded messages of type T."""

    def __init__(self, message_type: type[T], max_frame: int = MAX_FRAME) -> None:
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[T]:
        self._buffer += data
        messages: list[T] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self._max_frame:
                raise FrameError(f"frame of {length} bytes exceeds {self._max_frame}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            try:
                messages.append(self._decoder.decode(payload))
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                # msgspec raises UnicodeDecodeError (not DecodeError) for invalid
                # UTF-8 in a string: corrupt bytes all the same (found by fuzz/).
                raise FrameError(f"undecodable frame: {exc}") from exc
        return messages

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)


async def read_frames(
    stream: trio.abc.ReceiveStream, message_type: type[T], max_frame: int = MAX_FRAME
) -> AsyncIterator[T]:
    """Yield messages until the stream ends. A stream that ends mid-frame is an error."""
    decoder = FrameDecoder(message_type, max_frame)
    while True:
        data = await stream.receive_some(65536)
        if not data:
            if decoder.pending_bytes:
                raise FrameError("stream ended inside a frame")
            return
        for message in decoder.feed(data):
            yield message
