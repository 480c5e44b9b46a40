"""HTTP calls to a running node, for the client commands (`exo-trio pull`, `ls`,
`ps`, `run`, `rm`). The standard library's http.client: a streamed answer is read
line by line as it comes, and closing the connection is how a client stops a
generation (the node cancels the work of a client that went away)."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PORT = 52415
DEFAULT_HOST = f"http://127.0.0.1:{DEFAULT_PORT}"
HOST_ENV = "EXO_TRIO_HOST"
KEY_ENV = "EXO_TRIO_API_KEY"
TIMEOUT = 30.0  # seconds for a non-streamed answer (a stream waits as long as it lasts)


class ClientError(Exception):
    """The node answered with an error (or could not be reached); a sentence."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def base_url(host: str | None) -> str:
    """`--host` / $EXO_TRIO_HOST as a base URL: `host`, `host:port` or a URL."""
    text = (host or os.environ.get(HOST_ENV) or DEFAULT_HOST).strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"not a node address: {text!r}")
    if parts.port is None and parts.scheme == "http":
        return f"http://{parts.netloc}:{DEFAULT_PORT}"
    return f"{parts.scheme}://{parts.netloc}"


def error_message(status: int, body: bytes) -> str:
    """The message out of any dialect's error envelope."""
    try:
        value = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip() or f"HTTP {status}"
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    if error is not None:
        return str(error)
    return f"HTTP {status}"


@dataclass
class NodeClient:
    url: str
    api_key: str | None = None

    @classmethod
    def for_host(cls, host: str | None) -> NodeClient:
        return cls(base_url(host), os.environ.get(KEY_ENV) or None)

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        host = parts.hostname or "127.0.0.1"
        if parts.scheme == "https":
            return http.client.HTTPSConnection(host, parts.port, timeout=timeout)
        return http.client.HTTPConnection(host, parts.port, timeout=timeout)

    def _headers(self, body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @contextmanager
    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = TIMEOUT
    ) -> Iterator[http.client.HTTPResponse]:
        """An open response with a 2xx status (else ClientError with the node's
        message). Leaving the block closes the connection."""
        conn = self._connection(timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            try:
                conn.request(method, path, body=data, headers=self._headers(data is not None))
                response = conn.getresponse()
            except OSError as exc:
                raise ClientError(f"cannot reach the node at {self.url}: {exc}") from exc
            if response.status >= 300:
                raise ClientError(error_message(response.status, response.read()), response.status)
            yield response
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        with self.request(method, path, body) as response:
            data = response.read()
        return json.loads(data) if data.strip() else None

    def lines(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """POST and read an NDJSON answer object by object, as it streams. An
        `{"error": ...}` line raises ClientError."""
        with self.request("POST", path, body, timeout=None) as response:
            for raw in response:
                if not raw.strip():
                    continue
                item = json.loads(raw)
                if isinstance(item, dict) and "error" in item:
                    raise ClientError(str(item["error"]))
                yield item
