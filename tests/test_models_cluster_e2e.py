"""Two real node processes that start with no model, linked with a secret, each with
its own Hugging Face cache: a hub model placed across both through the placement
API is fetched by each node in part (the weight files of its own layers, and those
outside the layers), and the instance starts once both have theirs. Greedy output,
asked through either node, is mlx-lm's own on the whole model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from exo_trio.hub_plan import files_for_layers
from tests.fake_hub import FakeHub, split_weights
from tests.nodeproc import NodeProcess, free_port, start_node
from tests.reference import reference_greedy_text
from tests.test_cluster_e2e import SECRET, wait_until

MESSAGES = [{"role": "user", "content": "Explain structured concurrency."}]


@pytest.fixture(scope="module")
def split_model(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return split_weights(demo_model_dir, tmp_path_factory.mktemp("split") / "m")


@pytest.fixture(scope="module")
def nodes(
    split_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FakeHub, dict[str, NodeProcess], Path]]:
    root = tmp_path_factory.mktemp("pair")
    ports = {"a": free_port(), "b": free_port()}
    with FakeHub() as hub:
        hub.add_model_dir("org/split", split_model)
        procs: dict[str, NodeProcess] = {}
        try:
            for name, other in (("a", "b"), ("b", "a")):
                args = ["--node-id", name, "--listen", f"127.0.0.1:{ports[name]}", "--no-model"]
                args += ["--cluster-secret", SECRET, "--no-discovery"]
                args += ["--peer", f"127.0.0.1:{ports[other]}"]
                env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(root / name / "hf-cache")}
                procs[name] = start_node(None, root / name, *args, env=env)
            for proc in procs.values():
                proc.wait_healthy(120)  # healthy at once: no model to wait for
            yield hub, procs, root
        finally:
            for proc in procs.values():
                proc.stop()


def state(node: NodeProcess) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{node.base_url}/state", timeout=10).json()


def test_each_node_fetches_only_its_layers_files_and_the_instance_serves(
    nodes: tuple[FakeHub, dict[str, NodeProcess], Path],
    split_model: Path,
    demo_model_dir: Path,
    eos_ban: dict[str, int],
) -> None:
    hub, procs, root = nodes
    assert httpx.get(procs["a"].base_url + "/v1/models").json()["data"] == []
    wait_until(lambda: len(state(procs["a"])["members"]) == 2, what="both nodes linked")
    # Layer 0's file (rank 0 needs it, rank 1 does not) stalls on the hub for a while.
    hub.hold_after("model-00002-of-00005.safetensors", 1000)
    try:
        placed = httpx.post(
            procs["b"].base_url + "/v1/instances",
            json={"model": "org/split", "min_nodes": 2},
            timeout=60,
        )
        assert placed.status_code == 201, placed.text
        instance_id = placed.json()["id"]
        rank1 = placed.json()["instance"]["shards"][1]["node_id"]
        # Rank 1 has its files and waits: no runner starts while rank 0 downloads.
        wait_until(
            lambda: [s["state"] for s in state(procs[rank1])["shards"]] == ["fetched"],
            what="rank 1 fetched and waiting",
        )
        time.sleep(1.0)
        assert [s["state"] for s in state(procs[rank1])["shards"]] == ["fetched"]
        (instance,) = state(procs[rank1])["instances"]
        assert instance["state"] == "downloading"
    finally:
        hub.release()
    wait_until(
        lambda: any(
            i["id"] == instance_id and i["state"] == "ready" for i in state(procs["a"])["instances"]
        ),
        limit=180,
        what="the instance ready",
    )
    (instance,) = state(procs["a"])["instances"]
    weight_map = json.loads((split_model / "model.safetensors.index.json").read_text())
    weight_map = weight_map["weight_map"]
    for shard in instance["shards"]:
        snapshots = root / shard["node_id"] / "hf-cache" / "models--org--split" / "snapshots"
        (snapshot,) = snapshots.iterdir()
        have = {p.name for p in snapshot.glob("*.safetensors")}
        assert have == files_for_layers(weight_map, shard["start_layer"], shard["end_layer"])
        assert len(have) < 5  # not the whole model
    reference = reference_greedy_text(demo_model_dir, MESSAGES, 24)
    for name in ("a", "b"):
        client = openai.OpenAI(
            base_url=f"{procs[name].base_url}/v1", api_key="x", max_retries=0, timeout=120
        )
        result = client.chat.completions.create(
            model="org/split",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
            logit_bias=eos_ban,  # type: ignore[arg-type]
        )
        assert result.choices[0].message.content == reference
