"""End to end: a real `exo-trio node` process with the demo model, driven by the
official `openai` client (and raw httpx where the client hides what we check)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import openai
import pytest

from exo_trio.prompts import HFPromptEncoder
from tests.nodeproc import NodeProcess, start_node
from tests.reference import reference_greedy_text

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about trio nurseries."},
]


@pytest.fixture(scope="module")
def node(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(demo_model_dir, tmp_path_factory.mktemp("node"), "--keepalive", "0.05")
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ban_eos(demo_model_dir: Path) -> dict[str, int]:
    return {str(t): -100 for t in HFPromptEncoder(demo_model_dir).eos_token_ids}


def test_models_and_health(client: openai.OpenAI, node: NodeProcess) -> None:
    assert [m.id for m in client.models.list().data] == ["demo"]
    status, body = node.health()
    assert status == 200 and body["status"] == "ok"
    assert body["runner"]["state"] == "ready"  # type: ignore[index]


def test_greedy_completion_is_exact_and_matches_mlx_lm(
    client: openai.OpenAI, ban_eos: dict[str, int], demo_model_dir: Path
) -> None:
    result = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=32, temperature=0, logit_bias=ban_eos
    )
    choice = result.choices[0]
    assert choice.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 32
    assert result.usage.prompt_tokens == len(HFPromptEncoder(demo_model_dir).chat_tokens(MESSAGES))
    assert choice.message.content == reference_greedy_text(demo_model_dir, MESSAGES, 32)


def test_streaming_gives_the_same_text_and_a_usage_chunk(
    client: openai.OpenAI, ban_eos: dict[str, int]
) -> None:
    kwargs = dict(model="demo", messages=MESSAGES, max_tokens=40, temperature=0, logit_bias=ban_eos)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        **kwargs,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    usage_chunks = [c for c in chunks if not c.choices]
    assert text == whole
    assert finishes == ["length"]
    assert len(usage_chunks) == 1 and usage_chunks[0].usage is not None
    assert usage_chunks[0].usage.completion_tokens == 40
    assert chunks[0].choices[0].delta.role == "assistant"


def test_content_parts_and_stop_strings(client: openai.OpenAI, ban_eos: dict[str, int]) -> None:
    plain = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=30, temperature=0, logit_bias=ban_eos
    )
    parts = client.chat.completions.create(
        model="demo",
        messages=[
            MESSAGES[0],
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Tell me about "},
                    {"type": "text", "text": "trio nurseries."},
                ],
            },
        ],
        max_tokens=30,
        temperature=0,
        logit_bias=ban_eos,
    )
    text = plain.choices[0].message.content or ""
    assert parts.choices[0].message.content == text
    # Stop at a piece of the greedy text: the answer ends right before it.
    stop = text[10:14]
    assert stop.strip(), text
    stopped = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=30,
        temperature=0,
        logit_bias=ban_eos,
        stop=[stop],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, ban_eos: dict[str, int]) -> None:
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model="demo",
                messages=MESSAGES,
                max_tokens=20,
                temperature=0.9,
                seed=seed,
                logit_bias=ban_eos,
            )
            .choices[0]
            .message.content
            or ""
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_concurrent_streams_are_each_exact(client: openai.OpenAI, ban_eos: dict[str, int]) -> None:
    expected = (
        client.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=24, temperature=0, logit_bias=ban_eos
        )
        .choices[0]
        .message.content
    )
    results: list[tuple[str, int]] = []

    def run() -> None:
        stream = client.chat.completions.create(
            model="demo",
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,
            logit_bias=ban_eos,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        results.append((text, chunks[-1].usage.completion_tokens))  # type: ignore[union-attr]

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [(expected, 24)] * 8


def test_errors_use_the_openai_envelope(client: openai.OpenAI, node: NodeProcess) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad_type:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": 5}])  # type: ignore[list-item]
    assert bad_type.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=100_000)
    assert too_long.value.code == "context_length_exceeded"

    url = f"{node.base_url}/v1/chat/completions"
    malformed = httpx.post(url, content=b'{"model": "demo", "messages": [', timeout=10)
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    oversize = httpx.post(url, content=b"x" * (5 * 1024 * 1024), timeout=10)
    assert oversize.status_code == 413
    assert "error" in oversize.json()
    wrong_route = httpx.get(f"{node.base_url}/v1/nothing", timeout=10)
    assert wrong_route.status_code == 404 and "error" in wrong_route.json()


def runner_health(node: NodeProcess) -> dict[str, object]:
    return node.health()[1]["runner"]  # type: ignore[return-value]


def wait_idle(node: NodeProcess, timeout: float = 5.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner = runner_health(node)
        if runner["active_requests"] == 0 and node.health()[1]["open_streams"] == 0:
            return runner
        time.sleep(0.02)
    raise AssertionError(f"runner still busy: {node.health()[1]}")


def test_client_dropping_a_stream_stops_the_work(
    node: NodeProcess, ban_eos: dict[str, int]
) -> None:
    body = {
        "model": "demo",
        "messages": MESSAGES,
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": ban_eos,
    }
    with httpx.stream(
        "POST", f"{node.base_url}/v1/chat/completions", json=body, timeout=30
    ) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        assert runner_health(node)["active_requests"] == 1
    runner = wait_idle(node)
    assert runner["max_steps_after_cancel"] in (0, 1)


def test_client_dropping_a_non_streaming_request_stops_the_work(
    node: NodeProcess, ban_eos: dict[str, int]
) -> None:
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 1500, "logit_bias": ban_eos}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{node.base_url}/v1/chat/completions", json=body, timeout=0.5)
    runner = wait_idle(node)
    assert runner["max_steps_after_cancel"] in (0, 1)


def test_keepalives_while_a_long_prompt_prefills(
    node: NodeProcess, ban_eos: dict[str, int]
) -> None:
    long_prompt = "nursery cancel scope " * 150  # about 1200 tokens
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": long_prompt}],
        "max_tokens": 2,
        "stream": True,
        "logit_bias": ban_eos,
    }
    with httpx.stream(
        "POST", f"{node.base_url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    # The role chunk goes out at once; keep-alives follow until the first token.
    data = [i for i, line in enumerate(lines) if line.startswith("data:")]
    assert any(line == ": keep-alive" for line in lines[data[0] : data[1]]), lines[:5]
    assert lines[-1] == "data: [DONE]"


def test_killed_runner_gives_an_error_event_and_comes_back(
    node: NodeProcess, client: openai.OpenAI, ban_eos: dict[str, int]
) -> None:
    pid = runner_health(node)["pid"]
    assert isinstance(pid, int)
    stream = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=1500, logit_bias=ban_eos, stream=True
    )
    started = time.monotonic()
    with pytest.raises(openai.APIError) as error:
        for i, _ in enumerate(stream):
            if i == 3:
                os.kill(pid, signal.SIGKILL)
                started = time.monotonic()
    assert time.monotonic() - started < 5
    assert "runner" in str(error.value)
    restarted = node.wait_healthy(60)
    assert restarted["runner"]["pid"] != pid  # type: ignore[index]
    assert restarted["runner"]["restarts"] >= 1  # type: ignore[index]
    again = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=5, logit_bias=ban_eos
    )
    assert again.usage is not None and again.usage.completion_tokens == 5


def test_sigterm_shuts_down_cleanly(demo_model_dir: Path, tmp_path: Path) -> None:
    proc = start_node(demo_model_dir, tmp_path)
    body = proc.wait_healthy()
    runner_pid = body["runner"]["pid"]  # type: ignore[index]
    assert proc.stop() == 0
    log = proc.log()
    assert "Traceback" not in log, log
    assert "node stopped" in log
    with pytest.raises(ProcessLookupError):
        os.kill(runner_pid, 0)  # type: ignore[arg-type]


def test_demo_model_is_built_when_no_model_is_given(tmp_path: Path) -> None:
    proc = start_node(None, tmp_path)
    try:
        proc.wait_healthy()
        models = httpx.get(f"{proc.base_url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["demo"]
        assert (tmp_path / "models" / "demo" / "config.json").is_file()
    finally:
        proc.stop()
    json.loads((tmp_path / "models" / "demo" / "config.json").read_text())


# ---- kept-alive connections (issue 13: exo_trio/api/keep_alive.py) ----


def raw_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Read one whole HTTP/1.1 response from a raw socket (h11 parses it)."""
    conn = h11.Connection(h11.CLIENT)
    # h11 must have sent a request to read a response: hand it a stand-in.
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    sock.settimeout(timeout)
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body


def raw_request(method: str, path: str, body: bytes) -> tuple[bytes, bytes]:
    head = (
        f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


CHAT_BODY = json.dumps(
    {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
).encode()


def test_openai_client_chats_on_after_a_404(client: openai.OpenAI) -> None:
    """The report: an `openai` client that tried `embeddings.create` (a 404 answered
    before its body was read) then hung on `chat.completions.create` on the same
    connection, until its 600 s timeout."""
    quick = client.with_options(timeout=10.0)
    for _ in range(5):
        with pytest.raises(openai.NotFoundError):
            quick.embeddings.create(model="demo", input="x" * 1_000_000)
        started = time.monotonic()
        reply = quick.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3)
        assert reply.choices[0].message.content is not None
        assert time.monotonic() - started < 5.0


def test_a_body_10ms_after_its_headers_then_a_second_request(node: NodeProcess) -> None:
    """Raw socket: headers, the body 10 ms later (the 404 is ready before it), then a
    second request on the same connection: answered (it used to hang 10 times in 10)."""
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            head, body = raw_request("POST", "/v1/embeddings", b'{"input": "x"}')
            sock.sendall(head)
            time.sleep(0.01)
            sock.sendall(body)
            status, headers, _ = raw_response(sock)
            assert status == 404 and headers.get("connection") != "close"
            sock.sendall(b"".join(raw_request("POST", "/v1/chat/completions", CHAT_BODY)))
            status, _, answer = raw_response(sock)
            assert status == 200 and json.loads(answer)["choices"]


def test_an_answer_before_a_body_that_never_comes_says_close(node: NodeProcess) -> None:
    """A body that does not come: the early answer waits for it a moment, then says
    `connection: close` and the node closes the connection (no half-open hang)."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        head, _ = raw_request("POST", "/v1/embeddings", b'{"input": "x"}')
        sock.sendall(head)
        status, headers, _ = raw_response(sock)
        assert status == 404 and headers.get("connection") == "close"
        sock.settimeout(10)
        assert sock.recv(65536) == b""  # closed by the node


def test_an_idle_kept_alive_connection_is_closed(node: NodeProcess) -> None:
    """hypercorn's keep-alive timeout (5 s) closes an idle connection (one used to
    stay open for good)."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"".join(raw_request("POST", "/v1/chat/completions", CHAT_BODY)))
        assert raw_response(sock)[0] == 200
        started = time.monotonic()
        sock.settimeout(15)
        assert sock.recv(65536) == b""
        assert 4.0 < time.monotonic() - started < 10.0
