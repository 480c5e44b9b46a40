"""Streaming one request's events to its HTTP client, for every dialect.

The loop is the same everywhere (keep-alive ticks, text, a finish or a failure);
what differs is the bytes each dialect writes for them, which a StreamEncoder
supplies. Dialect encoders keep whatever per-stream state their wire format
needs (accumulated text, sequence numbers, token counts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from exo_trio.api.generation import Timing, events
from exo_trio.api.timeouts import RequestTimeouts
from exo_trio.node import Node
from exo_trio.types import ChunkGenerated, GenerationFailed, GenerationFinished, TextGeneration


class StreamEncoder:
    """Bytes for each step of a stream. Override what the dialect sends."""

    def start(self) -> list[bytes]:
        """Sent once, before anything else (e.g. a role chunk, message_start)."""
        return []

    def keepalive(self) -> list[bytes]:
        return []

    def token(self, event: ChunkGenerated) -> list[bytes]:
        """A generated token; by default its text (dialects with logprobs look at
        the whole chunk)."""
        return self.text(event.text) if event.text else []

    def text(self, text: str) -> list[bytes]:
        raise NotImplementedError

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        raise NotImplementedError

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        raise NotImplementedError


async def stream_response(
    node: Node,
    command: TextGeneration,
    encoder: StreamEncoder,
    keepalive: float | None,
    timeouts: RequestTimeouts | None = None,
) -> AsyncIterator[bytes]:
    timing = Timing()
    first = True
    async for event in events(node, command, keepalive, timing, timeouts):
        if first:
            await node.seams.faults.hit("before_first_write", command.request_id)
            for data in encoder.start():
                yield data
            first = False
        if event is None:
            out = encoder.keepalive()
        elif isinstance(event, ChunkGenerated):
            out = encoder.token(event)
        elif isinstance(event, GenerationFinished):
            out = (encoder.text(event.text) if event.text else []) + encoder.finish(event, timing)
        else:
            out = encoder.fail(event, timing)
        for data in out:
            yield data
