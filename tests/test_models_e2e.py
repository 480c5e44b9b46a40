"""End to end: hub models the way a user gets them. A real `exo-trio node`
process downloads from a local server speaking the hub's file API
(tests/fake_hub.py, reached through HF_ENDPOINT), serves under the hub id, pulls
and deletes through Ollama's API (the official `ollama` client), and the client
commands (`exo-trio pull | ls | ps | run | rm`) are run against it, `run` through a
pseudo-terminal."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.fake_hub import FakeHub
from tests.nodeproc import NodeProcess, start_node


@pytest.fixture(scope="module")
def hub(demo_model_dir: Path) -> Iterator[FakeHub]:
    config = (demo_model_dir / "config.json").read_bytes()
    with FakeHub() as server:
        server.add_model_dir("org/demo", demo_model_dir)
        server.add_model_dir("org/other", demo_model_dir, **{"notes.txt": b"another commit"})
        server.add_repo("org/huge", {"config.json": config, "model.safetensors": 10**13})
        server.add_repo("org/torch", {"config.json": config, "pytorch_model.bin": 50_000})
        yield server


def hub_env(hub: FakeHub, cache: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def node(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("node")
    proc = start_node("org/demo", data, env=hub_env(hub, data / "hf-cache"))
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def ollama_client(node: NodeProcess) -> ollama.Client:
    return ollama.Client(host=node.base_url)


def test_a_hub_model_is_served_under_its_hub_id(node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["org/demo"]
    answer = client.chat.completions.create(
        model="org/demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert answer.model == "org/demo" and answer.usage is not None
    with pytest.raises(openai.NotFoundError, match="Available: org/demo"):
        client.chat.completions.create(
            model="org/nope", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
    # The node downloaded it once placed, with progress lines in its log (not a TTY).
    assert "downloading org/demo: 100% of" in node.log()


def test_head_and_get_root_answer_like_ollama(node: NodeProcess) -> None:
    head = httpx.head(node.base_url + "/")
    assert head.status_code == 200
    get = httpx.get(node.base_url + "/")
    assert get.status_code == 200 and "running" in get.text


def test_pull_streams_progress_and_delete_removes(
    node: NodeProcess, ollama_client: ollama.Client
) -> None:
    updates = list(ollama_client.pull("org/other", stream=True))
    assert updates[0].status == "pulling manifest" and updates[-1].status == "success"
    weights = [u for u in updates if u.digest == "model.safetensors"]
    assert weights[-1].completed == weights[-1].total == 16_790_616
    names = [m.model for m in ollama_client.list().models]
    assert names == ["org/demo:latest", "org/other:latest"]
    ollama_client.delete("org/other")
    assert [m.model for m in ollama_client.list().models] == ["org/demo:latest"]
    with pytest.raises(ollama.ResponseError) as missing:
        ollama_client.delete("org/other")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as served:
        ollama_client.delete("org/demo")
    assert served.value.status_code == 409


def test_a_model_too_big_or_not_mlx_is_refused_with_its_reason(
    hub: FakeHub, ollama_client: ollama.Client
) -> None:
    with pytest.raises(ollama.ResponseError, match=r"org/huge is too big for this cluster"):
        list(ollama_client.pull("org/huge", stream=True))
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.pull("org/huge", stream=False)
    assert refused.value.status_code == 400 and "9313.2 GiB" in str(refused.value)
    with pytest.raises(ollama.ResponseError, match=r"PyTorch \.bin weights"):
        ollama_client.pull("org/torch")
    with pytest.raises(ollama.ResponseError) as missing:
        ollama_client.pull("org/missing", stream=False)
    assert missing.value.status_code == 404
    # Refused before a byte of their weights was asked for.
    fetched = {p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    weights = [p for p in fetched if p.endswith(("/model.safetensors", ".bin"))]
    assert not [p for p in weights if "/org/huge/" in p or "/org/torch/" in p]


# ---- the client commands ----


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXO_TRIO_HOST": f"127.0.0.1:{node.port}"}
    return subprocess.run(
        [sys.executable, "-m", "exo_trio.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_pull_ls_ps_rm(node: NodeProcess) -> None:
    pulled = cli(node, "pull", "org/other")
    assert pulled.returncode == 0, pulled.stderr
    assert "pulling org/other: 100% of 16.8 MB" in pulled.stderr and "success" in pulled.stderr
    listed = cli(node, "ls")
    assert listed.returncode == 0
    rows = [line.split()[0] for line in listed.stdout.splitlines()]
    assert rows == ["NAME", "org/demo", "org/other"]
    running = cli(node, "ps")
    assert running.returncode == 0
    (header, row) = running.stdout.splitlines()
    assert header.split()[:3] == ["ID", "MODEL", "STATE"]
    assert row.split()[1:3] == ["org/demo", "ready"]
    removed = cli(node, "rm", "org/other")
    assert removed.returncode == 0 and "deleted 'org/other'" in removed.stdout
    again = cli(node, "rm", "org/other")
    assert again.returncode == 1 and "not found" in again.stderr
    refused = cli(node, "pull", "org/huge")
    assert refused.returncode == 1 and "too big for this cluster's memory" in refused.stderr


def test_cli_run_with_a_prompt_answers_once(node: NodeProcess) -> None:
    answered = cli(node, "run", "org/demo", "hello", "there", "--max-tokens", "8")
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
    unreachable = subprocess.run(
        [sys.executable, "-m", "exo_trio.cli", "ls", "--host", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 1 and "cannot reach the node" in unreachable.stderr


class Terminal:
    """A child process on a pseudo-terminal, as a user at a terminal runs it."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its terminal is the pty
            os.execve(sys.executable, [sys.executable, *args], env)
        self.seen = b""
        self.mark = 0

    def read_until(self, text: str, timeout: float = 30.0) -> str:
        """Output up to and including the next `text` after the last one found."""
        deadline = time.monotonic() + timeout
        wanted = text.encode()
        while (at := self.seen.find(wanted, self.mark)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {text!r} in {self.seen[self.mark :]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    raise TimeoutError(f"exited before {text!r}: {self.seen!r}") from None
        start, self.mark = self.mark, at + len(wanted)
        return self.seen[start : self.mark].decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise TimeoutError("the child did not exit")


def open_streams(node: NodeProcess) -> int:
    return int(node.health()[1]["open_streams"])  # type: ignore[call-overload]


def test_cli_run_is_an_interactive_chat(node: NodeProcess) -> None:
    env = {**os.environ, "EXO_TRIO_HOST": f"127.0.0.1:{node.port}", "TERM": "dumb"}
    term = Terminal(["-m", "exo_trio.cli", "run", "org/demo", "--max-tokens", "12"], env)
    try:
        term.read_until(">>> ")
        term.type("hello\r")
        answer = term.read_until(">>> ")
        assert answer.strip().startswith("hello") and len(answer.strip()) > len("hello")
        # Several lines between triple quotes are one message.
        term.type('"""first line\r')
        term.read_until("... ")
        term.type('second line"""\r')
        term.read_until(">>> ")
        # Ctrl-C at the prompt does not leave.
        term.type("\x03")
        term.read_until("Use Ctrl + d or /bye to exit.")
        term.read_until(">>> ")
        term.type("/bye\r")
        assert term.wait() == 0
    finally:
        if term.pid:
            try:
                os.kill(term.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(term.fd)


def test_cli_run_ctrl_c_stops_the_answer_not_the_session(node: NodeProcess) -> None:
    env = {**os.environ, "EXO_TRIO_HOST": f"127.0.0.1:{node.port}", "TERM": "dumb"}
    # Long answers (the demo model rarely stops by itself).
    term = Terminal(["-m", "exo_trio.cli", "run", "org/demo", "--max-tokens", "1500"], env)
    try:
        term.read_until(">>> ")
        term.type("tell me everything\r")
        term.read_until("tell me everything\r\n")
        deadline = time.monotonic() + 30
        while open_streams(node) == 0:  # the answer is being written
            assert time.monotonic() < deadline
            time.sleep(0.05)
        term.type("\x03")
        term.read_until(">>> ", timeout=10)
        deadline = time.monotonic() + 10
        while open_streams(node) != 0:  # the node stopped generating
            assert time.monotonic() < deadline, "the generation went on after Ctrl-C"
            time.sleep(0.05)
        term.type("/bye\r")
        assert term.wait() == 0
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(term.fd)


# ---- several models on one node, placed at run time ----


def wait_for(predicate, what: str, limit: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def models_of(node: NodeProcess) -> dict[str, dict]:  # type: ignore[type-arg]
    return {m["id"]: m for m in httpx.get(node.base_url + "/v1/models").json()["data"]}


def test_two_models_on_one_node_a_request_to_each_one_deleted(
    node: NodeProcess, hub: FakeHub, ollama_client: ollama.Client
) -> None:
    client = openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="x", max_retries=0)
    # Placed from the hub at run time; its weights stall halfway for a while, so
    # the download's progress is seen in /v1/models and /state.
    hub.hold_after("model.safetensors", 12_000_000)
    try:
        placed = httpx.post(node.base_url + "/v1/instances", json={"model": "org/other"})
        assert placed.status_code == 201, placed.text
        instance_id = placed.json()["id"]
        entry = wait_for(
            lambda: (
                (m := models_of(node).get("org/other"))
                and m.get("download", {}).get("completed", 0) >= 10 * 2**20
                and m
            ),
            "download progress in /v1/models",
        )
        assert entry["status"] == "downloading"
        assert entry["download"]["total"] > 16_790_616  # the weights and the small files
        state = httpx.get(node.base_url + "/state").json()
        (instance,) = [i for i in state["instances"] if i["id"] == instance_id]
        assert instance["state"] == "downloading" and instance["download"]["completed"] > 0
        assert [d["model"] for d in state["downloads"]] == ["org/other"]
    finally:
        hub.release()
    wait_for(lambda: models_of(node)["org/other"]["status"] == "ready", "org/other ready")
    for name in ("org/demo", "org/other"):
        answer = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert answer.model == name and answer.usage is not None
    assert sorted(m.model for m in ollama_client.ps().models) == [
        "org/demo:latest",
        "org/other:latest",
    ]
    # Deleting its instance frees it: requests for it are 404 again, with a hint.
    assert httpx.delete(f"{node.base_url}/v1/instances/{instance_id}").status_code == 200
    wait_for(lambda: "org/other" not in models_of(node), "org/other unloaded")
    with pytest.raises(openai.NotFoundError, match=r"Available: org/demo\. .* in the store"):
        client.chat.completions.create(
            model="org/other", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
    # Ollama loads a pulled model on first use, and unloads it with keep_alive 0.
    reply = ollama_client.chat(
        model="org/other", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4}
    )
    assert reply.done and reply.message.content
    assert ollama_client.generate(model="org/other", keep_alive=0).done_reason == "unload"
    wait_for(lambda: "org/other" not in models_of(node), "org/other unloaded again")
    ollama_client.delete("org/other")


def test_placing_a_model_too_big_or_not_mlx_is_a_clear_4xx(node: NodeProcess) -> None:
    huge = httpx.post(node.base_url + "/v1/instances", json={"model": "org/huge"})
    assert huge.status_code == 400
    assert "org/huge is too big for this cluster's memory" in huge.json()["error"]["message"]
    torch = httpx.post(node.base_url + "/v1/instances", json={"model": "org/torch"})
    assert torch.status_code == 400 and "PyTorch .bin" in torch.json()["error"]["message"]
    missing = httpx.post(node.base_url + "/v1/instances", json={"model": "org/missing"})
    assert missing.status_code == 404
    with pytest.raises(ollama.ResponseError, match="try pulling it first"):
        ollama.Client(host=node.base_url).chat(
            model="org/missing", messages=[{"role": "user", "content": "hi"}]
        )


# ---- resuming, and a chosen name ----


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_download_cut_by_a_node_crash_resumes_and_serves_under_a_chosen_name(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    env = hub_env(hub, tmp_path / "hf-cache")
    blobs = tmp_path / "hf-cache" / "models--org--demo" / "blobs"
    # The hub sends 12 MB of the weights, then stalls; the node is killed there.
    hub.hold_after("model.safetensors", 12_000_000)
    first = start_node("org/demo", tmp_path / "a", env=env)
    try:
        deadline = time.monotonic() + 60
        while not [p for p in blobs.glob("*.incomplete") if p.stat().st_size >= 10 * 2**20]:
            assert first.process.poll() is None and time.monotonic() < deadline, first.log()
            time.sleep(0.05)
        first.process.kill()
        first.process.wait()
    finally:
        hub.release()
        if first.process.poll() is None:
            first.process.kill()
    sent_before = hub.bytes_sent["model.safetensors"]
    second = start_node("org/demo", tmp_path / "b", "--served-model-name", "mine", env=env)
    try:
        second.wait_healthy()
        assert hub.ranges("model.safetensors")[-1] == f"bytes={10 * 2**20}-"
        assert hub.bytes_sent["model.safetensors"] - sent_before == 16_790_616 - 10 * 2**20
        (snapshot,) = (tmp_path / "hf-cache" / "models--org--demo" / "snapshots").iterdir()
        assert sha(snapshot / "model.safetensors") == sha(demo_model_dir / "model.safetensors")
        models = httpx.get(second.base_url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["mine"]
    finally:
        second.stop()
