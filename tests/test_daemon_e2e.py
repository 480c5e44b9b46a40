"""The daemon as people run it: real `exo-trio node` processes, signals, ports in
use, a model that cannot load, the access log. Clients are the official ones."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.nodeproc import NodeProcess, free_port, start_node

LONG = 1800  # tokens: far longer than the drain timeout at the demo model's speed
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0): look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def clients(node: NodeProcess) -> dict[str, Callable[[], str]]:
    """Eight requests, every dialect, streaming and not; each returns 'finished'
    or raises what its client raises."""
    oai = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0)
    claude = anthropic.Anthropic(base_url=node.base_url, api_key="x", max_retries=0)
    olla = ollama.Client(host=node.base_url, timeout=60)
    more = {"ignore_eos": True}

    def chat_stream() -> str:
        stream = oai.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=LONG, stream=True, extra_body=more
        )  # type: ignore[call-overload]
        for _ in stream:
            pass
        return "finished"

    def chat() -> str:
        oai.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=LONG, extra_body=more
        )  # type: ignore[call-overload]
        return "finished"

    def completions_stream() -> str:
        for _ in oai.completions.create(
            model="demo", prompt="Once", max_tokens=LONG, stream=True, extra_body=more
        ):
            pass
        return "finished"

    def responses_stream() -> str:
        for _ in oai.responses.create(
            model="demo", input="hi", max_output_tokens=LONG, stream=True, extra_body=more
        ):
            pass
        return "finished"

    def messages_stream() -> str:
        with claude.messages.stream(
            model="demo", messages=MESSAGES, max_tokens=LONG, extra_body=more
        ) as stream:  # type: ignore[arg-type]
            for _ in stream:
                pass
        return "finished"

    def messages() -> str:
        claude.messages.create(model="demo", messages=MESSAGES, max_tokens=LONG, extra_body=more)  # type: ignore[arg-type]
        return "finished"

    def ollama_chat() -> str:
        options = {"num_predict": LONG, "ignore_eos": True}
        for _ in olla.chat(model="demo", messages=MESSAGES, stream=True, options=options):
            pass
        return "finished"

    def ollama_generate() -> str:
        options = {"num_predict": LONG, "ignore_eos": True}
        for _ in olla.generate(model="demo", prompt="Once", stream=True, options=options):
            pass
        return "finished"

    return {
        "openai chat stream": chat_stream,
        "openai chat": chat,
        "openai completions stream": completions_stream,
        "openai responses stream": responses_stream,
        "anthropic stream": messages_stream,
        "anthropic": messages,
        "ollama chat stream": ollama_chat,
        "ollama generate stream": ollama_generate,
    }


Outcomes = dict[str, object]


def run_all(requests: dict[str, Callable[[], str]]) -> tuple[Outcomes, list[threading.Thread]]:
    outcomes: dict[str, object] = {}

    def run(name: str, call: Callable[[], str]) -> None:
        try:
            outcomes[name] = call()
        except Exception as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in requests.items()]
    for thread in threads:
        thread.start()
    return outcomes, threads


def test_sigterm_drains_then_ends_every_dialect_with_its_error(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    node = start_node(demo_model_dir, tmp_path, "--drain-timeout", "4")
    try:
        runner_pid = node.wait_healthy()["runner"]["pid"]  # type: ignore[index]
        outcomes, threads = run_all(clients(node))
        deadline = time.monotonic() + 20
        while node.health()[1]["open_streams"] != 8:  # every request is running
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.05)
        node.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Draining: /health says so, a new request gets a 503 in its dialect.
        status, body = node.health()
        assert status == 503 and body["status"] == "draining"
        with pytest.raises(anthropic.APIStatusError, match="shutting down") as refused:
            anthropic.Anthropic(base_url=node.base_url, api_key="x", max_retries=0).messages.create(
                model="demo", messages=MESSAGES, max_tokens=5
            )  # type: ignore[arg-type]
        assert refused.value.status_code == 503
        for thread in threads:
            thread.join(20)
        assert node.process.wait(20) == 0
    finally:
        node.stop()
    assert len(outcomes) == 8
    for name, outcome in outcomes.items():
        # Nothing is cut: every request finished or got its dialect's explicit error.
        assert outcome == "finished" or (
            isinstance(outcome, openai.APIError | anthropic.APIError | ollama.ResponseError)
            and not isinstance(outcome, openai.APIConnectionError | anthropic.APIConnectionError)
            and "shutting down" in str(outcome)
        ), f"{name}: {outcome!r}"
    assert sum(o != "finished" for o in outcomes.values()) >= 4  # the drain did time out
    assert gone(runner_pid)
    log = node.log()
    assert "drain timeout: ended" in log and "Traceback" not in log
    # One access line per request, with its tokens, time to first token and id.
    lines = [line for line in log.splitlines() if "exo_trio.access" in line and "POST" in line]
    assert len(lines) >= 9
    assert all(" model=demo " in line and " id=" in line for line in lines if " 200 " in line)
    # (A cut request's line carries ttft= only if its first token came before the drain
    # ended, which a loaded machine does not promise; test_cli checks the line's fields.)
    assert any("end=shutting_down" in line for line in lines)


def test_a_second_signal_stops_at_once(demo_model_dir: Path, tmp_path: Path) -> None:
    node = start_node(demo_model_dir, tmp_path, "--drain-timeout", "60")
    try:
        runner_pid = node.wait_healthy()["runner"]["pid"]  # type: ignore[index]
        _, threads = run_all({"stream": clients(node)["openai chat stream"]})
        while node.health()[1]["open_streams"] != 1:
            time.sleep(0.05)
        node.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        started = time.monotonic()
        node.process.send_signal(signal.SIGINT)
        node.process.wait(15)
        assert time.monotonic() - started < 10  # not the 60 s drain
        threads[0].join(10)
    finally:
        node.stop()
    assert gone(runner_pid)
    assert "received SIGINT again: stopping now" in node.log()


def run_node_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_trio.cli", "node", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ports_in_use_fail_in_one_line_and_the_link_port_falls_back(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, names in (
            (["--api-port", str(port)], f"API port {port} on 127.0.0.1 is in use"),
            (["--api-port", str(free_port()), "--listen", f"127.0.0.1:{port}"], "--listen"),
        ):
            started = time.monotonic()
            result = run_node_cli(tmp_path, "--model", str(demo_model_dir), *flags)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and names in lines[0], result.stderr
            assert time.monotonic() - started < 15  # before anything heavy started

    # The default link port taken (by us here, or by another node): the next free one
    # above the API port is used, and the log says which.
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 52416))
        holder.listen()
    except OSError:
        pass  # already taken by someone else: the same situation
    try:
        node = start_node(demo_model_dir, tmp_path, "--listen", "", "--no-discovery")
        try:
            node.wait_healthy()
        finally:
            node.stop()
        assert "link port 52416 is taken; links listen on" in node.log()
    finally:
        holder.close()


def test_a_model_it_cannot_serve_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found once the node began describing its models (a hub model absent offline, a
    directory without config.json): still one line, status 2, no traceback."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, says in (
        ("nobody/nothing", "cannot serve nobody/nothing"),
        (str(not_a_model), "not an MLX model directory"),
    ):
        result = run_node_cli(tmp_path, "--api-port", str(free_port()), "--model", model)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and says in last, result.stderr
        assert last.startswith("exo-trio: ") and "Traceback" not in result.stderr


def test_a_model_that_cannot_load_is_not_restarted_forever(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    model = tmp_path / "unknown-arch"
    shutil.copytree(demo_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (model / "config.json").write_text(json.dumps(config))
    node = start_node(model, tmp_path / "data")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.2)
            try:
                status, body = node.health()
            except httpx.HTTPError:
                continue  # not listening yet
            if body["runner"] and body["runner"]["gave_up"]:  # type: ignore[index]
                break
        assert status == 503 and "no_such_architecture" in str(body["reason"])
        models = httpx.get(f"{node.base_url}/v1/models").json()["data"]
        assert models[0]["status"] == "failed" and "cannot be loaded" in models[0]["error"]
        time.sleep(3)  # no restart, no new placement
        assert node.log().count("started runner pid") == 1
        assert node.health()[1]["runner"]["restarts"] == 0  # type: ignore[index]
    finally:
        node.stop()
