"""Server-sent events framing."""

from __future__ import annotations

import msgspec

_json = msgspec.json.Encoder()

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def sse_data(payload: object) -> bytes:
    """One `data:` event holding a JSON payload (JSON never contains a raw newline)."""
    return b"data: " + _json.encode(payload) + b"\n\n"


def sse_event(event: str, payload: object) -> bytes:
    """A named event, as Anthropic and the Responses API send them."""
    return b"event: " + event.encode() + b"\ndata: " + _json.encode(payload) + b"\n\n"
