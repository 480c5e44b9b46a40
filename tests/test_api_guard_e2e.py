"""End to end: admission control, API keys, CORS and the refusal to serve a
non-loopback address without a key. One node with a batch of one and no queue,
so a single stream in flight fills it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.nodeproc import NodeProcess, serving, start_node

KEY = "s3cret-key"
ORIGIN = "http://allowed.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Tell me about trio nurseries."}]


@pytest.fixture(scope="module")
def node(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with serving(
        demo_model_dir,
        tmp_path_factory.mktemp("node"),
        "--max-batch", "1",
        "--max-queued", "0",
        "--api-key", KEY,
        "--cors-origin", ORIGIN,
    ) as proc:  # fmt: skip
        yield proc


@pytest.fixture(scope="module")
def ban(eos_ban: dict[str, int]) -> dict[str, int]:
    return eos_ban


def oai(node: NodeProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.base_url}/v1", api_key=key, max_retries=0)


def claude(node: NodeProcess, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.base_url, api_key=key, max_retries=0)


def olla(node: NodeProcess, key: str | None = KEY) -> ollama.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return ollama.Client(host=node.base_url, headers=headers, timeout=30)


def test_every_endpoint_but_health_needs_the_key(node: NodeProcess) -> None:
    assert httpx.get(f"{node.base_url}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/metrics", "/api/tags", "/api/version"):
        assert httpx.get(f"{node.base_url}{path}", timeout=10).status_code == 401, path
        assert httpx.get(f"{node.base_url}{path}", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(f"{node.base_url}/v1/models", headers={"x-api-key": KEY}).status_code == 200

    with pytest.raises(openai.AuthenticationError):
        oai(node, "wrong").chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert oai(node).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2).usage  # type: ignore[arg-type]

    with pytest.raises(anthropic.AuthenticationError) as denied:
        claude(node, "wrong").messages.create(model="demo", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # The anthropic client sends the key as x-api-key.
    reply = claude(node).messages.create(model="demo", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert reply.usage.output_tokens <= 2

    with pytest.raises(ollama.ResponseError) as refused:
        olla(node, None).chat(model="demo", messages=MESSAGES, options={"num_predict": 2})
    assert refused.value.status_code == 401 and "API key" in refused.value.error
    assert olla(node).chat(model="demo", messages=MESSAGES, options={"num_predict": 2}).done


def test_cors_only_for_configured_origins(node: NodeProcess) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    # Browsers send no credentials on a preflight: it must pass without the key.
    answer = httpx.options(f"{node.base_url}/v1/chat/completions", headers=preflight)
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert answer.headers["access-control-allow-headers"] == "authorization, content-type"

    other = httpx.options(
        f"{node.base_url}/v1/chat/completions",
        headers={**preflight, "Origin": "http://evil.example"},
    )
    assert "access-control-allow-origin" not in other.headers

    listed = httpx.get(f"{node.base_url}/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert "X-Request-Id" in listed.headers["access-control-expose-headers"]
    # Errors carry CORS headers too, or a browser could not read why it failed.
    denied = httpx.get(f"{node.base_url}/v1/models", headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN


def test_the_dashboard_is_open_and_its_data_needs_the_key(node: NodeProcess) -> None:
    """The page and its files hold no data: open, so a browser can load them and
    ask for the key. The event stream they read needs the key and honours CORS,
    and a preflight allows the DELETE the page sends for an instance."""
    url = node.base_url
    page = httpx.get(f"{url}/", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/dashboard/main.js">' in page.text
    script = httpx.get(f"{url}/dashboard/main.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(f"{url}/dashboard/nothing.js", timeout=10).status_code == 404
    assert httpx.get(f"{url}/dashboard/__init__.py", timeout=10).status_code == 404

    assert httpx.get(f"{url}/v1/events", timeout=10).status_code == 401
    with httpx.stream(
        "GET", f"{url}/v1/events", headers={**AUTH, "Origin": ORIGIN}, timeout=30
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == ORIGIN
        lines = stream.iter_lines()
        assert "event: snapshot" in [next(lines) for _ in range(3)]

    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"}
    answer = httpx.options(f"{url}/v1/instances/some-id", headers=preflight, timeout=10)
    assert answer.status_code == 204 and "DELETE" in answer.headers["access-control-allow-methods"]


def in_flight(node: NodeProcess) -> float:
    text = httpx.get(f"{node.base_url}/metrics", headers=AUTH, timeout=10).text
    line = next(li for li in text.splitlines() if li.startswith("exo_trio_requests_in_flight "))
    return float(line.split()[1])


def test_admission_refuses_beyond_the_bound_at_once(node: NodeProcess, ban: dict[str, int]) -> None:
    stream = oai(node).chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=1500,
        logit_bias=ban,
        stream=True,  # type: ignore[arg-type]
    )
    first = next(iter(stream))
    assert in_flight(node) == 1

    with pytest.raises(openai.RateLimitError) as chat_refused:
        oai(node).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert chat_refused.value.code == "server_overloaded"
    with pytest.raises(openai.RateLimitError):
        oai(node).completions.create(model="demo", prompt="hi", max_tokens=2)
    with pytest.raises(anthropic.RateLimitError) as messages_refused:
        claude(node).messages.create(model="demo", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert messages_refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        olla(node).generate(model="demo", prompt="hi", options={"num_predict": 2})
    assert ollama_refused.value.status_code == 503
    # Refused while the first stream still runs: not queued behind it (no timing asserted).
    assert in_flight(node) == 1

    # Cancelling the stream in flight frees the slot.
    cancelled = httpx.post(f"{node.base_url}/v1/cancel/{first.id}", headers=AUTH, timeout=10)
    assert cancelled.status_code == 200
    with pytest.raises(openai.APIError, match="cancelled"):
        list(stream)
    deadline = time.monotonic() + 5
    while in_flight(node) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert in_flight(node) == 0
    again = oai(node).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert again.usage is not None


def test_a_client_that_disconnects_frees_its_slot(node: NodeProcess, ban: dict[str, int]) -> None:
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 1500, "logit_bias": ban}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{node.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=0.3)
    deadline = time.monotonic() + 5
    while in_flight(node) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert in_flight(node) == 0


def test_a_public_address_needs_a_key(demo_model_dir: Path, tmp_path: Path) -> None:
    proc = start_node(demo_model_dir, tmp_path, "--api-host", "0.0.0.0")
    try:
        code = proc.process.wait(30)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise
    assert code != 0
    assert "--insecure-no-api-key" in proc.log() and "Traceback" not in proc.log()
