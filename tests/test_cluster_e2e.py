"""Several real node processes on loopback, linked with a cluster secret, driven with
the `openai` client: placement (automatic, pipeline, tensor), requests through a
node that holds no shard, a leader change, a killed node, a cut link, a restarted
node, and refused secrets. Greedy output must equal mlx-lm's own, token for token
(the text of a greedy run is a function of its tokens)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.netproxy import CuttableProxy
from tests.nodeproc import NodeProcess, free_port, start_node
from tests.reference import reference_greedy_text

SECRET = "test-cluster-secret"
MESSAGES = [{"role": "user", "content": "Explain structured concurrency."}]


@dataclass
class Cluster:
    model_dir: Path
    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    peers: dict[str, list[str]] = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    def start(self, name: str) -> NodeProcess:
        args = ["--node-id", name, "--listen", f"127.0.0.1:{self.ports[name]}"]
        # Explicit peers only: discovery would find the other test nodes (and route
        # around the cut-link test's proxy).
        args += ["--cluster-secret", SECRET, "--no-discovery", *self.extra]
        for peer in self.peers[name]:
            args += ["--peer", peer]
        self.nodes[name] = start_node(self.model_dir, self.root / name, *args)
        return self.nodes[name]

    def state(self, name: str) -> dict:  # type: ignore[type-arg]
        return httpx.get(f"{self.nodes[name].base_url}/state", timeout=10).json()

    def client(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.nodes[name].base_url}/v1", api_key="x", max_retries=0, timeout=120
        )

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.process.poll() is None:
                node.stop()


def mesh(model_dir: Path, root: Path, names: str, *extra: str) -> Cluster:
    cluster = Cluster(model_dir, root, extra=extra)
    cluster.ports = {n: free_port() for n in names}
    cluster.peers = {n: [f"127.0.0.1:{cluster.ports[m]}" for m in names if m != n] for n in names}
    return cluster


def wait_until(predicate, limit: float = 90.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def ready_instances(cluster: Cluster, name: str) -> list[dict]:  # type: ignore[type-arg]
    return [i for i in cluster.state(name)["instances"] if i["state"] == "ready"]


def place(cluster: Cluster, via: str, nodes: list[str], sharding: str = "pipeline") -> str:
    response = httpx.post(
        f"{cluster.nodes[via].base_url}/v1/instances",
        json={"model": "demo", "sharding": sharding, "nodes": nodes},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    instance_id = response.json()["id"]
    wait_until(
        lambda: any(i["id"] == instance_id for i in ready_instances(cluster, via)),
        what=f"instance {instance_id} ready",
    )
    return instance_id


def delete_all(cluster: Cluster, via: str) -> None:
    for instance in cluster.state(via)["instances"]:
        response = httpx.delete(
            f"{cluster.nodes[via].base_url}/v1/instances/{instance['id']}", timeout=30
        )
        # 404: it went away on its own (a failed instance being torn down).
        assert response.status_code in (200, 404), response.text
    wait_until(lambda: not cluster.state(via)["instances"], what="instances gone")


def greedy(client: openai.OpenAI, max_tokens: int, eos_ban: dict[str, int]) -> str:
    result = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=max_tokens, temperature=0, logit_bias=eos_ban
    )
    assert result.usage is not None and result.usage.completion_tokens == max_tokens
    return result.choices[0].message.content or ""


@pytest.fixture(scope="module")
def trio_cluster(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    cluster = mesh(demo_model_dir, tmp_path_factory.mktemp("cluster"), "abc")
    try:
        for name in "abc":
            cluster.start(name)
        for name in "abc":
            cluster.nodes[name].wait_healthy(120)
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> dict[int, str]:
    return {n: reference_greedy_text(demo_model_dir, MESSAGES, n) for n in (24, 200)}


def test_automatic_placement_spans_every_node(
    trio_cluster: Cluster, reference: dict[int, str], eos_ban: dict[str, int]
) -> None:
    (instance,) = ready_instances(trio_cluster, "c")
    assert sorted(s["node_id"] for s in instance["shards"]) == ["a", "b", "c"]
    assert instance["auto"] and instance["sharding"] == "pipeline"
    state = trio_cluster.state("b")
    assert state["leader"] == "a" and state["members"] == ["a", "b", "c"]
    assert greedy(trio_cluster.client("b"), 24, eos_ban) == reference[24]


@pytest.mark.parametrize("sharding", ["pipeline", "tensor"])
def test_split_across_two_nodes_through_a_third(
    trio_cluster: Cluster, reference: dict[int, str], eos_ban: dict[str, int], sharding: str
) -> None:
    delete_all(trio_cluster, "c")
    place(trio_cluster, "c", ["a", "b"], sharding)
    # c holds no shard: its requests go to a (rank 0) and tokens come back to c.
    assert greedy(trio_cluster.client("c"), 24, eos_ban) == reference[24]
    stream = trio_cluster.client("c").chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        logit_bias=eos_ban,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference[24]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


def test_a_request_is_cancelled_through_any_node(
    trio_cluster: Cluster, eos_ban: dict[str, int]
) -> None:
    """POST /v1/cancel reaches whichever node the request's client is connected
    to: a stream through c is cancelled through a, and ends with an error."""
    if not ready_instances(trio_cluster, "c"):
        place(trio_cluster, "c", ["a", "b"])
    stream = trio_cluster.client("c").chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=1500, logit_bias=eos_ban, stream=True
    )
    answers = []
    with pytest.raises(openai.APIError, match="cancelled"):
        for i, chunk in enumerate(stream):
            if i == 5:
                answers.append(
                    httpx.post(f"{trio_cluster.nodes['a'].base_url}/v1/cancel/{chunk.id}")
                )
            assert i < 1000, "the stream went on after its cancel"
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["cancelled"] is True
    # An id no node has: 404 in OpenAI's envelope, after every peer said no.
    unknown = httpx.post(f"{trio_cluster.nodes['b'].base_url}/v1/cancel/chatcmpl-nobody")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "request_not_found"


def test_a_leader_change_during_streaming_loses_no_chunk(
    trio_cluster: Cluster, reference: dict[int, str], eos_ban: dict[str, int]
) -> None:
    delete_all(trio_cluster, "c")
    place(trio_cluster, "c", ["b", "c"])
    term = trio_cluster.state("c")["term"]
    stream = trio_cluster.client("c").chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        logit_bias=eos_ban,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for i, chunk in enumerate(stream):
        if i == 10:
            trio_cluster.nodes["a"].process.kill()  # the leader dies mid-stream
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == reference[200]
    assert usage is not None and usage.completion_tokens == 200
    wait_until(lambda: trio_cluster.state("c")["leader"] == "b", what="b leading")
    assert trio_cluster.state("c")["term"] > term

    # The old leader restarts with the same id and rejoins; the cluster serves on.
    trio_cluster.start("a")
    trio_cluster.nodes["a"].wait_healthy(120)
    wait_until(lambda: trio_cluster.state("b")["members"] == ["a", "b", "c"], what="a rejoined")
    assert greedy(trio_cluster.client("a"), 24, eos_ban) == reference[24]


def test_a_killed_node_ends_streams_with_an_error_and_the_rest_serve_again(
    trio_cluster: Cluster, reference: dict[int, str], eos_ban: dict[str, int]
) -> None:
    delete_all(trio_cluster, "a")
    place(trio_cluster, "a", ["b", "c"])
    stream = trio_cluster.client("a").chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=1500, logit_bias=eos_ban, stream=True
    )
    killed_at = 0.0
    with pytest.raises(openai.APIError):
        for i, _ in enumerate(stream):
            if i == 10:
                trio_cluster.nodes["c"].process.kill()  # rank 1 of the instance
                killed_at = time.monotonic()
    assert killed_at and time.monotonic() - killed_at < 15
    # The broken instance is torn down; the model can be placed on what is left.
    wait_until(
        lambda: (
            not any(
                i["state"] != "failed" and "c" in {s["node_id"] for s in i["shards"]}
                for i in trio_cluster.state("a")["instances"]
            )
        ),
        what="instance torn down",
    )
    delete_all(trio_cluster, "a")
    place(trio_cluster, "a", ["a", "b"])
    assert greedy(trio_cluster.client("a"), 24, eos_ban) == reference[24]
    trio_cluster.start("c")
    trio_cluster.nodes["c"].wait_healthy(120)
    assert greedy(trio_cluster.client("c"), 24, eos_ban) == reference[24]


def test_wrong_or_missing_secret_is_refused(
    trio_cluster: Cluster, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{trio_cluster.ports['a']}"
    wrong = start_node(
        demo_model_dir,
        tmp_path / "wrong",
        "--node-id",
        "intruder",
        "--cluster-secret",
        "not-the-cluster-secret",
        "--peer",
        target,
    )
    missing = start_node(
        demo_model_dir, tmp_path / "missing", "--node-id", "nosecret", "--peer", target
    )
    try:
        wrong.wait_healthy(120)
        missing.wait_healthy(120)
        time.sleep(3)
        assert trio_cluster.state("a")["members"] == ["a", "b", "c"]
        assert httpx.get(f"{wrong.base_url}/state", timeout=10).json()["members"] == ["intruder"]
        assert "authentication failed" in wrong.log()
        assert httpx.get(f"{missing.base_url}/state", timeout=10).json()["members"] == ["nosecret"]
    finally:
        wrong.stop()
        missing.stop()


def test_a_cut_link_ends_streams_with_an_error_and_heals(
    demo_model_dir: Path, tmp_path: Path, reference: dict[int, str], eos_ban: dict[str, int]
) -> None:
    # x runs the model; y reaches x only through a proxy the test can cut.
    pair = Cluster(demo_model_dir, tmp_path, extra=("--placement", "manual"))
    pair.ports = {"x": free_port(), "y": free_port()}
    proxy = CuttableProxy(pair.ports["x"])
    pair.peers = {"x": [], "y": [f"127.0.0.1:{proxy.port}"]}
    try:
        pair.start("x")
        pair.start("y")
        wait_until(lambda: pair.state("y")["members"] == ["x", "y"], what="link up")
        place(pair, "y", ["x"])
        wait_until(lambda: ready_instances(pair, "y"), what="y sees the instance")
        stream = pair.client("y").chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=1500, logit_bias=eos_ban, stream=True
        )
        cut_at = 0.0
        with pytest.raises(openai.APIError) as error:
            for i, _ in enumerate(stream):
                if i == 10:
                    proxy.cut()
                    cut_at = time.monotonic()
        assert cut_at and time.monotonic() - cut_at < 15
        assert "lost" in str(error.value)
        proxy.heal()
        wait_until(lambda: ready_instances(pair, "y"), what="link healed")
        wait_until(lambda: pair.nodes["y"].health()[0] == 200, what="y healthy")
        assert greedy(pair.client("y"), 24, eos_ban) == reference[24]
    finally:
        pair.stop_all()
        proxy.close()


def test_sigterm_on_the_node_running_a_relayed_stream_ends_it_explicitly(
    trio_cluster: Cluster, eos_ban: dict[str, int]
) -> None:
    """b runs the model, the client streams through a: when b is stopped, a's client
    gets the stream's end or an explicit error through the link, never a cut."""
    import signal

    delete_all(trio_cluster, "a")
    place(trio_cluster, "a", ["b"])
    stream = trio_cluster.client("a").chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=1900, logit_bias=eos_ban, stream=True
    )
    outcome: object = "finished"
    try:
        for i, _ in enumerate(stream):
            if i == 5:
                trio_cluster.nodes["b"].process.send_signal(signal.SIGTERM)
    except openai.APIError as exc:
        outcome = exc
    assert outcome == "finished" or (
        not isinstance(outcome, openai.APIConnectionError) and "shutting down" in str(outcome)
    ), repr(outcome)
    assert trio_cluster.nodes["b"].process.wait(30) == 0
    assert "Traceback" not in trio_cluster.nodes["b"].log()
