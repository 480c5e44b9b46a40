"""GET /v1/events on a real node: a snapshot, then the changes as they happen
(an instance deleted and placed again, tokens generated), an open stream that
leaves nothing behind when its client goes, and one that ends when the node stops."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from exo_trio.api.events import MAX_SUBSCRIBERS
from tests.nodeproc import NodeProcess, serving


@pytest.fixture(scope="module")
def node(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # Unpinned: a pinned runner shares core 0 with every other suite's on this machine.
    folder = tmp_path_factory.mktemp("events")
    with serving(demo_model_dir, folder, "--cpu-affinity", "off") as proc:
        yield proc


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event name, decoded data) of each server-sent event."""
    name, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def next_matching(stream: Iterator[tuple[str, Any]], want: Any, limit: float = 60) -> Any:
    deadline = time.monotonic() + limit
    for name, body in stream:
        if want(name, body):
            return body
        assert time.monotonic() < deadline, "no such event in time"
    raise AssertionError("the stream ended")


def test_a_snapshot_then_each_change(node: NodeProcess) -> None:
    url = node.base_url
    with httpx.stream("GET", f"{url}/v1/events", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = events(response)
        name, snap = next(stream)
        assert name == "snapshot"
        me = snap["cluster"]["node_id"]
        assert snap["cluster"]["leader"] == me and snap["nodes"][me]["self"]
        assert snap["nodes"][me]["memory_total"] > 0
        (instance,) = snap["instances"].values()
        assert instance["state"] == "ready" and instance["shards"][0]["runner"] == "ready"

        deleted = httpx.delete(f"{url}/v1/instances/{instance['id']}", timeout=30)
        assert deleted.status_code == 200
        next_matching(
            stream,
            lambda n, b: n == "instance" and b["op"] == "removed" and b["id"] == instance["id"],
        )
        placed = httpx.post(f"{url}/v1/instances", json={"model": "demo"}, timeout=30)
        assert placed.status_code == 201
        new_id = placed.json()["id"]
        next_matching(stream, lambda n, b: n == "instance" and b["id"] == new_id)
        next_matching(
            stream,
            lambda n, b: n == "instance" and b["id"] == new_id and b["value"]["state"] == "ready",
        )
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "demo",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 12,
                "ignore_eos": True,
            },
            timeout=60,
        )
        assert answer.status_code == 200
        next_matching(
            stream,
            lambda n, b: (
                n == "metrics"
                and b["value"]["models"].get("demo", {}).get("generated_tokens", 0) >= 12
            ),
        )


def test_a_subscriber_that_goes_leaves_nothing(node: NodeProcess) -> None:
    """Streams that open and go: the node's count of them (in the metrics every
    stream sends) rises with them and falls back when their clients leave."""
    url = f"{node.base_url}/v1/events"
    with httpx.stream("GET", url, timeout=30) as watcher:
        watch = events(watcher)
        assert next(watch)[1]["metrics"]["event_streams"] == 1
        others = [httpx.stream("GET", url, timeout=30) for _ in range(3)]
        # Kept: a dropped line iterator would close its response at once.
        readers = [events(other.__enter__()) for other in others]
        assert [next(reader)[0] for reader in readers] == ["snapshot"] * 3
        next_matching(watch, lambda n, b: n == "metrics" and b["value"]["event_streams"] == 4)
        for other in others:
            other.__exit__(None, None, None)
        next_matching(watch, lambda n, b: n == "metrics" and b["value"]["event_streams"] == 1)


def test_streams_beyond_the_bound_are_refused(node: NodeProcess) -> None:
    url = f"{node.base_url}/v1/events"
    opened: list[Any] = []
    try:
        for _ in range(MAX_SUBSCRIBERS):
            stream = httpx.stream("GET", url, timeout=30)
            opened.append(stream)
            assert stream.__enter__().status_code == 200
        refused = httpx.get(url, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "too_many_subscribers"
    finally:
        for stream in opened:
            stream.__exit__(None, None, None)
    # Streams whose clients went are no longer counted: a new one is taken again.
    deadline = time.monotonic() + 60
    while True:
        with httpx.stream("GET", url, timeout=30) as again:
            if again.status_code == 200:
                break
        assert time.monotonic() < deadline, "the closed streams are still counted"
        time.sleep(0.1)


def test_a_stream_ends_when_the_node_stops(node: NodeProcess) -> None:
    """Last: it stops the module's node."""
    with httpx.stream("GET", f"{node.base_url}/v1/events", timeout=30) as response:
        stream = events(response)
        assert next(stream)[0] == "snapshot"
        node.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        # Whatever changes as it drains, then the end: a clean one if the stream saw
        # the drain first, else the connection closes under it.
        with contextlib.suppress(httpx.RemoteProtocolError):
            for _ in stream:
                # A bound on a hang, not a speed (the machine may be loaded): an
                # event stream is no request to drain, so the node stops at once.
                assert time.monotonic() - stopped < 60, "the stream outlives its node"
    assert node.process.wait(60) == 0
