"""A small HTTP/1.1 client over one simulated stream, and response framings.

The simulated clients speak real HTTP to the real app on hypercorn (whose server
side is h11, as in production): a request per connection, or several one after
the other on a kept-alive one (pipelined too), each response read incrementally
(sized or chunked) so a client can stop, disconnect, at any point.
The client side is a small strict parser rather than h11: it runs for every byte
of every response of every seed, and hypercorn's output is all it must read.
The framings turn body bytes into messages: SSE events, NDJSON lines, or one
JSON document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import trio


class ProtocolError(Exception):
    """The server's bytes are not a valid HTTP/1.1 response."""


@dataclass
class ResponseHead:
    status: int
    headers: dict[str, str]


@dataclass
class Body:
    data: bytes


class End:
    """The response ended as its framing says."""


class Closed:
    """The connection ended before the response did (or was not HTTP)."""


Event = ResponseHead | Body | End | Closed


class ResponseParser:
    """Incremental HTTP/1.1 response parser: head, then a sized, chunked or
    read-until-close body."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = "head"  # head, sized, chunk-size, chunk-data, chunk-end, trailers, eof, done
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._state == "done"

    def next_response(self) -> list[Event]:
        """After a complete response on a kept-alive connection: parse the next one
        from what is already buffered."""
        if self._state != "done":
            raise ProtocolError("the previous response is not complete")
        self._state = "head"
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def feed(self, data: bytes) -> list[Event]:
        """Events for the bytes so far; b"" means the peer closed."""
        if not data:
            if self._state == "eof":
                self._state = "done"
                return [End()]
            return [] if self._state == "done" else [Closed()]
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _step(self, events: list[Event]) -> bool:
        state, buffer = self._state, self._buffer
        if state == "head":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            del buffer[: end + 4]
            version, _, rest = head[0].partition(" ")
            if version != "HTTP/1.1" or not rest[:3].isdigit():
                raise ProtocolError(f"bad status line {head[0]!r}")
            headers = {}
            for line in head[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ProtocolError(f"bad header line {line!r}")
                headers[name.strip().lower()] = value.strip()
            events.append(ResponseHead(int(rest[:3]), headers))
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self._state = "chunk-size"
            elif "content-length" in headers:
                self._remaining = int(headers["content-length"])
                self._state = "sized"
                if not self._remaining:
                    self._state = "done"
                    events.append(End())
            else:
                self._state = "eof"
            return True
        if state in ("sized", "eof"):
            if not buffer:
                return False
            take = len(buffer) if state == "eof" else min(self._remaining, len(buffer))
            events.append(Body(bytes(buffer[:take])))
            del buffer[:take]
            if state == "sized":
                self._remaining -= take
                if not self._remaining:
                    self._state = "done"
                    events.append(End())
            return True
        if state == "chunk-size":
            line = self._line()
            if line is None:
                return False
            try:
                self._remaining = int(line.split(b";")[0], 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {line!r}") from None
            self._state = "chunk-data" if self._remaining else "trailers"
            return True
        if state == "chunk-data":
            if not buffer:
                return False
            take = min(self._remaining, len(buffer))
            events.append(Body(bytes(buffer[:take])))
            del buffer[:take]
            self._remaining -= take
            if not self._remaining:
                self._state = "chunk-end"
            return True
        if state == "chunk-end":
            if len(buffer) < 2:
                return False
            if buffer[:2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            del buffer[:2]
            self._state = "chunk-size"
            return True
        if state == "trailers":
            line = self._line()
            if line is None:
                return False
            if not line:
                self._state = "done"
                events.append(End())
            return True
        # done: the next response's bytes wait in the buffer (keep-alive)
        return False


def request_bytes(
    method: str,
    target: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    close: bool = True,
    host: str = "sim",
) -> tuple[bytes, bytes]:
    """The head and the body of a request (`close`: ask for `connection: close`)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    if close:
        extra += "connection: close\r\n"
    head = (
        f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}\r\n"
    )
    return head.encode(), body


class HttpClient:
    def __init__(
        self,
        stream: trio.abc.Stream,
        host: str = "sim",
        pause: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.stream = stream
        self.host = host
        self._pause = pause  # before each read from the socket (a slow reader)
        self._parser = ResponseParser()
        self._events: list[Event] = []

    async def send_request(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        close: bool = True,
    ) -> None:
        head, body = request_bytes(method, target, body, headers, close=close, host=self.host)
        await self.stream.send_all(head + body)

    def next_response(self) -> None:
        """Read the next response on this connection (after the last one's End)."""
        self._events = self._parser.next_response()

    def push_back(self, event: Event) -> None:
        """Make `event` the next one `next_event` returns."""
        self._events.insert(0, event)

    async def next_event(self, read_size: int = 65536) -> Event:
        """The next event: ResponseHead, Body, End, or Closed (the connection ended
        before the response did, or carried something that is not HTTP)."""
        while not self._events:
            if self._pause is not None:
                await self._pause()
            data = await self.stream.receive_some(read_size)
            try:
                self._events = self._parser.feed(data)
            except ProtocolError:
                self._events = [Closed()]
            if not data and not self._events:
                self._events = [Closed()]
        return self._events.pop(0)


class SSEDecoder:
    """Server-sent events: yields (event name or None, data string) per event;
    comments (keep-alives) yield ("comment", text)."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, data: bytes) -> Iterator[tuple[str | None, str]]:
        self._buffer += data.decode()
        while "\n\n" in self._buffer:
            block, self._buffer = self._buffer.split("\n\n", 1)
            name: str | None = None
            lines: list[str] = []
            for line in block.split("\n"):
                if line.startswith(":"):
                    yield "comment", line[1:].strip()
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    lines.append(line[5:].removeprefix(" "))
            if lines:
                yield name, "\n".join(lines)

    @property
    def leftover(self) -> str:
        return self._buffer


class NDJSONDecoder:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Iterator[tuple[str | None, str]]:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                yield None, line.decode()

    @property
    def leftover(self) -> str:
        return self._buffer.decode(errors="replace")


class WholeBodyDecoder:
    """Non-streaming responses: the whole body is one message, at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> Iterator[tuple[str | None, str]]:
        self._parts.append(data)
        return iter(())

    def finish(self) -> str:
        return b"".join(self._parts).decode()

    @property
    def leftover(self) -> str:
        return ""


def loads(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
