"""Two nodes against one, through HTTP, in one run; and how fast a node's death
reaches the clients.

    python -m bench.cluster [--model DIR | --size demo|medium] [--tokens 128] [--repeats 3]
                            [--rounds 5]

Each round places the model twice, one placement at a time (never both at once,
so they never share the cores), and streams `--repeats` requests through each:

1. on one node alone: streaming decode tokens/s;
2. pipeline-split across two nodes on loopback (placed with POST /v1/instances),
   driven through the node holding rank 0: tokens/s, and the ratio to (1).

The ratio is taken within each round (best of its repeats against best of its
repeats) and summarised over the rounds: on a shared machine the load shifts
from one moment to the next, and only figures measured close together compare.
The load average is printed alongside. Finally:

3. a client streams through a third node while the node holding rank 1 is
   SIGKILLed: the time from the kill to the client's error event.

Like bench.node_vs_mlx it preloads OpenBLAS when it is present (so both
configurations run on the same BLAS); `--blas none` turns that off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.node_vs_mlx import add_model_arguments, preload_blas
from exo_trio.demo_model import build_demo_model
from tests.nodeproc import NodeProcess, free_port, start_node

BODY = {
    "model": "bench",
    "messages": [{"role": "user", "content": "Write a long story about structured concurrency."}],
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def stream_tps(node: NodeProcess, tokens: int) -> float:
    """Decode tokens/s of one streaming request, first token to last."""
    stamps = []
    with httpx.stream(
        "POST",
        f"{node.base_url}/v1/chat/completions",
        json={**BODY, "max_tokens": tokens},
        timeout=300,
    ) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def wait_ready(node: NodeProcess, instance_id: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = httpx.get(f"{node.base_url}/state", timeout=10).json()
        if any(i["id"] == instance_id and i["state"] == "ready" for i in state["instances"]):
            return
        time.sleep(0.2)
    raise TimeoutError(instance_id)


def place(node: NodeProcess, nodes: list[str]) -> str:
    response = httpx.post(
        f"{node.base_url}/v1/instances", json={"model": "bench", "nodes": nodes}, timeout=30
    )
    response.raise_for_status()
    instance_id = response.json()["id"]
    wait_ready(node, instance_id)
    return instance_id


def start_cluster(model_dir: Path, root: Path, names: str) -> dict[str, NodeProcess]:
    ports = {n: free_port() for n in names}
    nodes = {}
    for name in names:
        args = ["--node-id", name, "--listen", f"127.0.0.1:{ports[name]}", "--placement", "manual"]
        for other in names:
            if other != name:
                args += ["--peer", f"127.0.0.1:{ports[other]}"]
        nodes[name] = start_node(model_dir, root / name, *args)
    for node in nodes.values():
        wait_members(node, len(names))
    return nodes


def wait_members(node: NodeProcess, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if len(httpx.get(f"{node.base_url}/state", timeout=10).json()["members"]) == count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("cluster did not form")


def death_to_error(nodes: dict[str, NodeProcess]) -> float:
    """Seconds from SIGKILL of rank 1's node to the error event at the client."""
    killed_at = None
    with httpx.stream(
        "POST",
        f"{nodes['c'].base_url}/v1/chat/completions",
        json={**BODY, "max_tokens": 1500},
        timeout=300,
    ) as response:
        for count, line in enumerate(response.iter_lines()):
            if count == 20:
                nodes["b"].process.kill()
                killed_at = time.perf_counter()
            if line.startswith("data: {") and '"error"' in line:
                assert killed_at is not None
                return time.perf_counter() - killed_at
    raise AssertionError("the stream ended without an error event")


def remove(node: NodeProcess, instance_id: str) -> None:
    httpx.delete(f"{node.base_url}/v1/instances/{instance_id}", timeout=30).raise_for_status()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(f"{node.base_url}/state", timeout=10).json()
        if not state["instances"]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"instance {instance_id} was not removed")


def measure(node: NodeProcess, nodes: list[str], tokens: int, repeats: int) -> list[float]:
    instance_id = place(node, nodes)
    try:
        stream_tps(node, 8)  # warm-up
        return [stream_tps(node, tokens) for _ in range(repeats)]
    finally:
        remove(node, instance_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blas", default="auto")
    args = parser.parse_args()
    blas = preload_blas(args.blas, "bench.cluster")

    load_before = os.getloadavg()
    rounds: list[tuple[list[float], list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model or build_demo_model(root / "bench", args.size)
        nodes = start_cluster(model_dir, root, "abc")
        try:
            for _ in range(args.rounds):
                single = measure(nodes["a"], ["a"], args.tokens, args.repeats)
                split = measure(nodes["a"], ["a", "b"], args.tokens, args.repeats)
                rounds.append((single, split))
                print(
                    f"round {len(rounds)}: 1 node {max(single):6.1f} tok/s, "
                    f"2 nodes {max(split):6.1f} tok/s, ratio {max(split) / max(single):.3f}, "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            place(nodes["a"], ["a", "b"])
            death = death_to_error(nodes)
        finally:
            for node in nodes.values():
                if node.process.poll() is None:
                    node.stop()
    load_after = os.getloadavg()

    ratios = [max(split) / max(single) for single, split in rounds]
    one = max(max(single) for single, _ in rounds)
    two = max(max(split) for _, split in rounds)
    print(
        f"model: {model_dir.name}, {args.tokens} tokens, {args.rounds} rounds of best of "
        f"{args.repeats}, BLAS: {blas}"
    )
    print(f"load average before {_load(load_before)}, after {_load(load_after)}")
    print(f"1 node decode tokens/s (best):              {one:8.1f}")
    print(f"2 nodes pipeline decode tokens/s (best):    {two:8.1f}")
    print(
        f"2 nodes / 1 node, per round:                median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    )
    print(f"node death to client error event:          {death * 1e3:8.0f} ms")
    print(
        json.dumps(
            {
                "single": one,
                "pipeline2": two,
                "ratio_median": statistics.median(ratios),
                "ratios": ratios,
                "death_s": death,
                "rounds": rounds,
                "load_before": load_before,
                "load_after": load_after,
            }
        )
    )


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    main()
