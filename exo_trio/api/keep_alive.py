"""HTTP/1.1 connections that can be reused, and that close when they must.

Under quart-trio and hypercorn (as found by the simulator, and reproduced with a
plain quart-trio app on hypercorn), a connection could be left neither reusable
nor closed:

- hypercorn does its work after a response (readying the connection for the next
  request and starting its keep-alive timer, or closing it) inside the app's last
  `send`; quart-trio cancels the request's tasks as soon as the response is sent,
  so that work is cut short at its first checkpoint. The keep-alive timer never
  started (an idle connection stayed open for good), and a connection hypercorn
  meant to close, after answering a request before its body arrived (a 404 for an
  unknown route, a 405, a 413, a 401), was left half-open: the next request sent
  on it was never answered (a client waited out its whole timeout).
- Such an early answer leaves the request's body unread, so the connection cannot
  be kept alive, but nothing told the client, which then raced the close.

`ConnectionReuse` (ASGI middleware, the outermost one) shields the response's last
`send` from cancellation, so hypercorn's work after it always completes. It cannot
block for long: its writes are bounded by --send-timeout (api/serving.py) and the
rest is bookkeeping. And an answer that is ready before the request's body has
been received waits for the body (up to BODY_WAIT) so that the connection can be
reused; failing that it says `connection: close`, so the client takes a new
connection for its next request instead of racing the close. Not for a body over
--max-body-bytes (a 413): that is not worth waiting for, and saying close would
make h11 drop the connection, unanswered, at the first byte the client sends
after the body; hypercorn closes it after the answer if the body is still coming.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

Message = dict[str, Any]

# How long an early answer waits for the rest of its request's body.
BODY_WAIT = 1.0


def body_length(scope: dict[str, Any]) -> int | None:
    """The request body's declared length: 0 for none, None when not declared
    (chunked)."""
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
        if name == b"transfer-encoding":
            return None
    return 0


class ConnectionReuse:
    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        length = body_length(scope)
        body_received = trio.Event()
        if length == 0:
            body_received.set()

        async def receive_tracked() -> Message:
            message = await receive()
            if message.get("type") == "http.request" and not message.get("more_body", False):
                body_received.set()
            return message

        async def send_guarded(message: Message) -> None:
            kind = message.get("type")
            small = length is None or length <= self.max_body_bytes
            if kind == "http.response.start" and small and not body_received.is_set():
                # (The app reads the body as it arrives, even when it answers without
                # looking at it.)
                with trio.move_on_after(BODY_WAIT):
                    await body_received.wait()
                if not body_received.is_set():
                    headers = [*message.get("headers", ()), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            if kind == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
                return
            await send(message)

        await self.app(scope, receive_tracked, send_guarded)
