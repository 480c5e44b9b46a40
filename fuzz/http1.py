"""Just enough HTTP/1.1 for the fuzz targets and tests: raw requests out, strict
response parsing in.

Requests are built as raw bytes so a target can send what a well-behaved client
library never would (odd header values, a chunked body, a method a route does not
take). Every request asks for `Connection: close`, so a response is everything
the server writes before it closes; `parse_response` then checks its framing
strictly (a truncated chunked body is an incomplete response, not a short one).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


class BadResponse(Exception):
    """The server's bytes are not a well-formed HTTP/1.1 response."""


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    complete: bool  # the body ended as its framing says (not cut by a close)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    chunked: bool = False,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: node"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        framed = body
    lines.append("Connection: close")
    head = "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n"
    return head + framed


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return bytes(data)
        data += chunk


async def exchange(
    stream: trio.abc.Stream, request: bytes, *, head_request: bool = False
) -> RawResponse:
    """Send one request and read the whole response (the server closes after it)."""
    await stream.send_all(request)
    raw = await read_all(stream)
    await stream.aclose()
    return parse_response(raw, head_request=head_request)


def parse_response(raw: bytes, *, head_request: bool = False) -> RawResponse:
    while True:
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            raise BadResponse(f"no complete response head in {raw[:200]!r}")
        # Skip interim responses (100 Continue, for a request that expected it).
        if raw.startswith(b"HTTP/1.1 1") and not raw.startswith(b"HTTP/1.1 101"):
            raw = raw[end + 4 :]
            continue
        break
    head, rest = raw[:end].decode("latin-1"), raw[end + 4 :]
    status_line, *header_lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[0] != "HTTP/1.1" or not parts[1].isdigit():
        raise BadResponse(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadResponse(f"bad header line {line!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    status = int(parts[1])
    if head_request or status in (204, 304) or 100 <= status < 200:
        return RawResponse(status, headers, b"", True)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = dechunk(rest)
        return RawResponse(status, headers, body, complete)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if len(rest) > length:
            raise BadResponse(f"{len(rest) - length} bytes after the body")
        return RawResponse(status, headers, rest, len(rest) == length)
    return RawResponse(status, headers, rest, True)


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body's bytes, and whether the final (zero) chunk was there."""
    body = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return bytes(body), False
        size_text = data[pos:line_end].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadResponse(f"bad chunk size {size_text[:20]!r}") from None
        start = line_end + 2
        if size == 0:
            return bytes(body), data[start:].startswith(b"\r\n")
        if len(data) < start + size + 2:
            body += data[start : start + size]
            return bytes(body), False
        if data[start + size : start + size + 2] != b"\r\n":
            raise BadResponse("chunk not followed by CRLF")
        body += data[start : start + size]
        pos = start + size + 2
