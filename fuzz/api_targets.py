"""Fuzz targets for the HTTP API: each dialect's request parsing and validation.

An input is four control bytes and a body. The control bytes pick the route, the
method, the query string, a path variant, the content type, the transfer
encoding, and auth / CORS / odd headers; the body is sent as is (the mutator
keeps it mostly JSON). Each input becomes one raw HTTP/1.1 request to a node in
this process (fuzz/inproc.py: the production app on hypercorn, a fake runner
behind it), and the whole response is checked (fuzz/checks.py). After each
exchange the node must be clean: no channel registered, no admission slot held,
no job left on the worker or the runner.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

from exo_trio.api.settings import ApiSettings
from exo_trio.demo_model import ensure_demo_model
from exo_trio.prompts import HFPromptEncoder, PromptEncoder
from fuzz.checks import (
    PropertyViolation,
    check_error_envelope,
    check_generation,
    check_ollama_load,
    fail,
    load_json,
    normalized_path,
)
from fuzz.http1 import BadResponse, RawResponse, build_request, exchange
from fuzz.inproc import InProcessNode
from fuzz.portal import Portal
from fuzz.quiet import quiet

HEADER = 4
# Real seconds a request may take before it counts as a hang. A healthy one takes
# milliseconds (the fake runner does not wait between steps).
HANG_SECONDS = 10.0
API_KEY = "fuzz-key"
ORIGIN = "https://app.example"

GENERATION_ROUTES = {
    "/v1/chat/completions",
    "/bench/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/api/chat",
    "/api/generate",
    "/ollama/api/chat",
    "/ollama/api/generate",
}

ROUTES: dict[str, list[tuple[str, str]]] = {
    "api_openai_chat": [("POST", "/v1/chat/completions"), ("POST", "/bench/chat/completions")],
    "api_completions": [("POST", "/v1/completions")],
    "api_responses": [("POST", "/v1/responses")],
    "api_anthropic": [("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")],
    "api_ollama": [
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/ollama/api/chat"),
        ("POST", "/ollama/api/generate"),
        ("POST", "/api/show"),
    ],
    # Everything else, behind an API key and CORS: routing, methods, auth headers.
    "api_guard": [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/demo"),
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("POST", "/v1/cancel/chatcmpl-1"),
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/api/version"),
        ("POST", "/api/show"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/messages"),
        ("POST", "/api/generate"),
        ("GET", "/nowhere"),
    ],
}

METHODS = ("GET", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "POST")
QUERIES = ("?stream=true", "?a=%ff%fe", "?model=x&model=y", "?" + "q=1&" * 200, "?%00", "?;;")
PATH_VARIANTS = ("{}/", "/{}", "{}%2F", "{}/../x", "{}?", "{}/demo", "{}%00")
CONTENT_TYPES = (
    "text/plain",
    "application/json; charset=latin-1",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
    "",
)
AUTH_HEADERS = (
    [("Authorization", f"Bearer {API_KEY}")],
    [("x-api-key", API_KEY)],
    [("Authorization", f"bearer   {API_KEY}  ")],
    [("Authorization", "Bearer wrong")],
    [("Authorization", "Basic Zm9vOmJhcg==")],
    [("x-api-key", "")],
    [("Authorization", "Bearer"), ("x-api-key", API_KEY)],
    [("Authorization", f"Bearer {API_KEY}x")],
)
ODD_HEADERS = (
    [("X-Request-Id", "chatcmpl-1")],
    [("Content-Encoding", "gzip")],
    [("Expect", "100-continue")],
    [("Accept", "application/x-ndjson")],
    [("X-Long", "a" * 8000)],
    [("Origin", "null"), ("Access-Control-Request-Method", "POST")],
    [
        ("Origin", ORIGIN),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "x-api-key"),
    ],
    [("Origin", "https://evil.example")],
)


@dataclass
class ApiRequest:
    method: str
    target: str  # path and query, as sent
    route: str  # the route it was derived from
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool

    @property
    def path(self) -> str:
        return normalized_path(self.target)

    def raw(self) -> bytes:
        return build_request(
            self.method, self.target, self.headers, self.body, chunked=self.chunked
        )


def decode_input(data: bytes, routes: list[tuple[str, str]], *, guarded: bool) -> ApiRequest:
    ctl = data[:HEADER].ljust(HEADER, b"\0")
    body = data[HEADER:]
    method, route = routes[ctl[0] % len(routes)]
    flags = ctl[1]
    target = route
    headers: list[tuple[str, str]] = []
    if guarded and not flags & 0x20:
        # Behind a key most requests should get past the guard to reach handlers.
        headers.append(("Authorization", f"Bearer {API_KEY}"))
    if flags & 0x01:
        ctype = CONTENT_TYPES[ctl[3] % len(CONTENT_TYPES)]
        if ctype:
            headers.append(("Content-Type", ctype))
    else:
        headers.append(("Content-Type", "application/json"))
    if flags & 0x04:
        method = METHODS[(ctl[3] >> 4) % len(METHODS)]
    if flags & 0x10:
        target = PATH_VARIANTS[(ctl[2] >> 4) % len(PATH_VARIANTS)].format(target)
    if flags & 0x08:
        target += QUERIES[ctl[2] % len(QUERIES)]
    if flags & 0x20:
        headers += AUTH_HEADERS[ctl[3] % len(AUTH_HEADERS)]
    if flags & 0x40:
        headers += [("Origin", ORIGIN)]
    if flags & 0x80:
        headers += ODD_HEADERS[(ctl[2] + ctl[3]) % len(ODD_HEADERS)]
    return ApiRequest(method, target, route, headers, body, chunked=bool(flags & 0x02))


def h11_accepts(raw: bytes) -> bool:
    """Whether the request is valid HTTP/1.1 at all (h11 is what hypercorn parses
    with; a request it refuses gets hypercorn's bare 400, which is correct)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                return True
    except h11.RemoteProtocolError:
        return False


def check_response(request: ApiRequest, response: RawResponse) -> None:
    if response.status >= 500:
        fail(f"{response.status}: {response.body[:300]!r}")
    if not response.complete:
        fail(f"{response.status} response cut short: {response.body[-200:]!r}")
    if request.method == "HEAD" or response.status in (204, 304):
        return
    if 400 <= response.status < 500:
        check_error_envelope(response, request.path)
        return
    if not 200 <= response.status < 300:
        fail(f"unexpected status {response.status}")
    if request.method == "OPTIONS":
        return  # an automatic OPTIONS answer or a CORS preflight: no body to check
    path = request.path
    if path in GENERATION_ROUTES:
        if path.endswith(("/api/chat", "/api/generate")) and "x-request-id" not in response.headers:
            check_ollama_load(load_json(response.body, "Ollama body"))
        else:
            echo = echoed_prompt(request) if "completions" in path else ""
            check_generation(response, path, echo)
    elif path == "/v1/messages/count_tokens":
        body = load_json(response.body, "count_tokens body")
        if not isinstance(body.get("input_tokens"), int):
            fail(f"count_tokens answered {body!r:.200}")
    elif path == "/metrics":
        if b"exo_trio_requests_in_flight" not in response.body:
            fail("metrics without exo_trio_requests_in_flight")
    else:
        load_json(response.body, f"{path} body")


def echoed_prompt(request: ApiRequest) -> str:
    """What a legacy completion echoes before its text (the request was accepted,
    so its body is valid JSON with a string or list prompt)."""
    try:
        # msgspec skips unknown keys without decoding them, so a body may be
        # accepted with invalid UTF-8 in a key: read it leniently.
        body = json.loads(request.body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return ""
    if not isinstance(body, dict) or body.get("echo") is not True:
        return ""
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else str(prompt[0]) if prompt else ""


@functools.cache
def demo_encoder() -> PromptEncoder:
    """The demo model's real tokenizer and chat template (built once per machine
    into the temp dir), so prompts go through the same code as in production."""
    model = ensure_demo_model(Path(tempfile.gettempdir()) / "exo-trio-fuzz")
    # Long fuzzed prompts make transformers warn on every request.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return HFPromptEncoder(model)


class ApiHarness:
    def __init__(self, name: str, encoder: PromptEncoder | None = None) -> None:
        self.routes = ROUTES[name]
        self.guarded = name == "api_guard"
        encoder = encoder or demo_encoder()
        settings = ApiSettings(
            max_body_bytes=256 * 1024,
            api_key=API_KEY if self.guarded else None,
            cors_origins=(ORIGIN,) if self.guarded else (),
        )
        # The node logs every refused request and every 4xx; keep the fuzzer quiet.
        self.restore = quiet({"exo_trio": logging.CRITICAL, "hypercorn.error": logging.CRITICAL})

        async def setup(nursery: trio.Nursery) -> InProcessNode:
            # A short context keeps every generation short (the fake runner stops at
            # max_tokens, and a prompt plus max_tokens must fit). EOS after 12 tokens
            # unless the request says ignore_eos.
            return await InProcessNode.start(
                nursery,
                encoder,
                settings=settings,
                context_length=256,
                vocab_size=2048,
                eos_after=12,
            )

        self._setup = setup
        self._start()

    def _start(self) -> None:
        self.portal = Portal(self._setup)
        self.node: InProcessNode = self.portal.world
        self.dirty = False

    def one(self, data: bytes) -> None:
        request = decode_input(data, self.routes, guarded=self.guarded)
        raw = request.raw()
        if not h11_accepts(raw):
            return  # not HTTP: hypercorn's concern, and it answers a bare 400
        if self.dirty:
            # A failed input may leave state behind; the next one (hypothesis
            # shrinking, say) must not be blamed for it.
            self.portal.close()
            self._start()
        try:
            self.portal.call(self._exchange, request, raw)
        except BaseException:
            self.dirty = True
            raise

    async def _exchange(self, request: ApiRequest, raw: bytes) -> None:
        with trio.move_on_after(HANG_SECONDS) as scope:
            stream = self.node.connect()
            try:
                response = await exchange(stream, raw, head_request=request.method == "HEAD")
            except BadResponse as exc:
                fail(f"malformed HTTP response: {exc}")
            check_response(request, response)
            left = await self.node.settle(limit=2.0)
            if left:
                fail(f"left behind after the exchange: {left}")
        if scope.cancelled_caught:
            raise PropertyViolation(f"no complete response within {HANG_SECONDS:g}s (a hang)")

    def close(self) -> None:
        self.portal.close()
        self.restore()


def make(name: str) -> ApiHarness:
    return ApiHarness(name)
