"""Per-request time limits, wedged-runner health and the slow-reader bound.

Everything runs in one process under MockClock (the autojump_clock fixture): a node
whose runner is sim.fake_runner (which can hang: it keeps its pipe open and keeps
reading commands, but stops stepping), served by the production app on hypercorn
over in-memory streams (fuzz/inproc.py). Virtual time makes a 600 s limit as fast
to test as a 1 s one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from exo_trio.api.generation import events
from exo_trio.api.serving import BoundedSendStream, SendTimeout
from exo_trio.api.settings import ApiSettings
from exo_trio.api.timeouts import RequestTimeouts
from exo_trio.types import (
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    SamplingParams,
    TextGeneration,
)
from fuzz.checks import parse_ndjson, parse_sse
from fuzz.http1 import RawResponse, build_request, exchange
from fuzz.inproc import InProcessNode, expected_text
from sim.encoder import SimEncoder


async def start(nursery: trio.Nursery, step_delay: float = 0.01, **settings: Any) -> InProcessNode:
    return await InProcessNode.start(
        nursery,
        SimEncoder(),
        settings=ApiSettings(**settings),
        context_length=4096,
        step_delay=step_delay,
    )


def command(rid: str, max_tokens: int = 50) -> TextGeneration:
    return TextGeneration(
        request_id=rid,
        model="demo",
        prompt_tokens=[1, 2],
        params=SamplingParams(max_tokens=max_tokens),
    )


async def collect(
    node: InProcessNode,
    cmd: TextGeneration,
    limits: RequestTimeouts,
    keepalive: float | None = None,
) -> list[tuple[float, GenerationEvent | None]]:
    out: list[tuple[float, GenerationEvent | None]] = []
    async for event in events(node.node, cmd, keepalive, timeouts=limits):
        out.append((trio.current_time(), event))
    return out


def failure(out: list[tuple[float, GenerationEvent | None]]) -> tuple[float, GenerationFailed]:
    at, last = out[-1]
    assert isinstance(last, GenerationFailed)
    return at, last


# ---- the limits, in the shared lifecycle ----


async def test_no_first_token_ends_the_request_after_the_ttft_limit(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery)
        node.runner.hang()
        t0 = trio.current_time()
        out = await collect(node, command("a"), RequestTimeouts(ttft=5, idle=0, total=0))
        at, failed = failure(out)
        assert failed.kind == "timeout" and "time-to-first-token" in failed.message
        assert at - t0 == pytest.approx(5)
        # The runner was told to drop the work, and nothing is left anywhere.
        assert await node.settle(1) == {}
        assert node.worker.stats.cancels_sent == 1
        nursery.cancel_scope.cancel()


async def test_a_runner_that_stops_mid_stream_hits_the_idle_limit(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, step_delay=0.1)
        limits = RequestTimeouts(ttft=100, idle=3, total=0)
        chunks = []
        last_chunk_at = 0.0
        async for event in events(node.node, command("b", 1000), timeouts=limits):
            if isinstance(event, ChunkGenerated):
                chunks.append(event)
                last_chunk_at = trio.current_time()
                if len(chunks) == 4:
                    node.runner.hang()
            else:
                assert isinstance(event, GenerationFailed) and event.kind == "timeout"
                assert "idle" in event.message
                assert trio.current_time() - last_chunk_at == pytest.approx(3)
        # Every token made before the stall reached the client, in order.
        assert [c.seq for c in chunks] == [0, 1, 2, 3]
        assert await node.settle(1) == {}
        nursery.cancel_scope.cancel()


async def test_a_slow_request_hits_the_total_limit(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, step_delay=1.0)
        t0 = trio.current_time()
        out = await collect(node, command("c", 100), RequestTimeouts(ttft=0, idle=0, total=3.5))
        at, failed = failure(out)
        assert "total" in failed.message and at - t0 == pytest.approx(3.5)
        assert [type(e) for _, e in out[:-1]] == [ChunkGenerated] * 3
        nursery.cancel_scope.cancel()


async def test_zero_means_no_limit(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery)
        node.runner.hang()
        with trio.move_on_after(100_000) as scope:
            await collect(node, command("d"), RequestTimeouts.off())
        assert scope.cancelled_caught
        nursery.cancel_scope.cancel()


async def test_keepalives_continue_until_the_limit(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery)
        node.runner.hang()
        t0 = trio.current_time()
        out = await collect(node, command("e"), RequestTimeouts(ttft=3.5, idle=0, total=0), 1.0)
        assert [round(at - t0, 3) for at, e in out if e is None] == [1.0, 2.0, 3.0]
        assert failure(out)[0] - t0 == pytest.approx(3.5)
        nursery.cancel_scope.cancel()


def test_next_deadline_picks_the_earliest_limit_that_applies() -> None:
    class T:
        started = 10.0
        first_token: float | None = None
        last_token: float | None = None

    limits = RequestTimeouts(ttft=5, idle=2, total=60)
    deadline = limits.next_deadline(T())
    assert deadline is not None and (deadline.at, deadline.kind) == (15.0, "ttft")
    after = T()
    after.first_token, after.last_token = 11.0, 12.0
    deadline = limits.next_deadline(after)
    assert deadline is not None and (deadline.at, deadline.kind) == (14.0, "idle")
    assert RequestTimeouts(0, 0, 0).next_deadline(T()) is None
    deadline = RequestTimeouts(0, 0, 3).next_deadline(T())
    assert deadline is not None and deadline.kind == "total"


# ---- every dialect ends a stuck request with its own error ----

BODY = {"model": "demo", "max_tokens": 20}
CASES = [
    ("/v1/chat/completions", {**BODY, "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/completions", {**BODY, "prompt": "x"}),
    ("/v1/responses", {"model": "demo", "input": "x", "max_output_tokens": 20}),
    ("/v1/messages", {**BODY, "messages": [{"role": "user", "content": "x"}]}),
    ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "x"}]}),
    ("/api/generate", {"model": "demo", "prompt": "x"}),
]


async def post(node: InProcessNode, path: str, body: dict[str, object]) -> RawResponse:
    raw = build_request(
        "POST", path, [("Content-Type", "application/json")], json.dumps(body).encode()
    )
    return await exchange(node.connect(), raw)


@pytest.mark.parametrize(("path", "body"), CASES, ids=[c[0] for c in CASES])
async def test_streaming_timeout_is_the_dialects_error_event(
    autojump_clock: Any, path: str, body: dict[str, object]
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, ttft_timeout=2.0, keepalive_interval=0.5)
        node.runner.hang()
        stream = {"stream": True} if not path.startswith("/api/") else {}
        response = await post(node, path, {**body, **stream})
        assert response.status == 200 and response.complete
        if path.startswith("/api/"):
            last = parse_ndjson(response.body)[-1]
            assert "timed out" in last["error"]
        else:
            last_event = parse_sse(response.body)[-1]
            payload = json.loads(last_event.data)
            if path == "/v1/messages":
                assert last_event.event == "error"
                assert payload["error"]["type"] == "timeout_error"
            elif path == "/v1/responses":
                assert last_event.event == "response.failed"
                assert payload["response"]["error"]["code"] == "timeout"
            else:
                assert payload["error"]["code"] == "timeout"
        assert await node.settle(1) == {}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("path", "body"), CASES, ids=[c[0] for c in CASES])
async def test_non_streaming_timeout_is_a_504_in_the_dialects_envelope(
    autojump_clock: Any, path: str, body: dict[str, object]
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, ttft_timeout=2.0)
        node.runner.hang()
        response = await post(node, path, {**body, "stream": False})
        assert response.status == 504
        envelope = json.loads(response.body)
        if path == "/v1/messages":
            assert envelope["error"]["type"] == "timeout_error"
        elif path.startswith("/api/"):
            assert "timed out" in envelope["error"]
        else:
            assert envelope["error"]["code"] == "timeout"
        assert await node.settle(1) == {}
        nursery.cancel_scope.cancel()


async def test_default_limits_leave_a_healthy_stream_alone(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, step_delay=0.5)  # 40 tokens over 20 virtual seconds
        body = {**CASES[0][1], "stream": True, "max_tokens": 40}
        response = await post(node, "/v1/chat/completions", body)
        rid = response.headers["x-request-id"]
        events_ = parse_sse(response.body)
        assert events_[-1].data == "[DONE]"
        text = "".join(
            json.loads(e.data)["choices"][0]["delta"].get("content") or "" for e in events_[:-1]
        )
        assert text == expected_text(rid, 40)
        nursery.cancel_scope.cancel()


# ---- wedged runner health ----


async def get_health(node: InProcessNode) -> tuple[int, dict[str, Any]]:
    response = await exchange(node.connect(), build_request("GET", "/health"))
    return response.status, json.loads(response.body)


async def test_health_reports_a_wedged_runner(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, wedge_timeout=10.0, ttft_timeout=0, idle_timeout=0)
        assert (await get_health(node))[0] == 200
        node.runner.hang()
        body = {**CASES[0][1], "stream": True, "max_tokens": 5}
        nursery.start_soon(post, node, "/v1/chat/completions", body)
        await trio.sleep(9)
        status, health = await get_health(node)
        assert status == 200 and health["runner"]["stalled_for"] == pytest.approx(9, abs=0.1)
        await trio.sleep(2)
        status, health = await get_health(node)
        assert status == 503 and health["status"] == "unavailable"
        assert "runner wedged: 1 request(s) in hand and no progress for 11s" in health["reason"]
        # It comes back as soon as the runner makes progress again.
        node.runner.resume()
        assert await node.settle(5) == {}
        status, health = await get_health(node)
        assert status == 200 and health["runner"]["stalled_for"] == 0
        nursery.cancel_scope.cancel()


async def test_an_idle_runner_is_never_wedged(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, wedge_timeout=1.0)
        node.runner.hang()  # hung, but with no work it owes nothing
        await trio.sleep(100)
        assert node.worker.stalled_for() == 0
        assert (await get_health(node))[0] == 200
        nursery.cancel_scope.cancel()


# ---- slow readers: a bounded write ----


async def test_a_blocked_write_gives_up_and_closes(autojump_clock: Any) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    bounded = BoundedSendStream(server, 2.0)  # type: ignore[arg-type]
    t0 = trio.current_time()
    with pytest.raises(SendTimeout):
        await bounded.send_all(b"x" * 10)  # nobody reads
    assert trio.current_time() - t0 == pytest.approx(2.0) and bounded.timed_out
    while await client.receive_some():  # whatever was in flight, then EOF: closed
        pass


async def test_a_client_that_stops_reading_is_dropped_and_its_work_cancelled(
    autojump_clock: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery, step_delay=0.01, send_timeout=5.0)
        body = json.dumps({**CASES[0][1], "stream": True, "max_tokens": 3000}).encode()
        headers = [("Content-Type", "application/json")]
        raw = build_request("POST", "/v1/chat/completions", headers, body)
        stalled = node.connect(lockstep=True)
        await stalled.send_all(raw)
        assert (await stalled.receive_some(200)).startswith(b"HTTP/1.1 200")
        t0 = trio.current_time()
        # Meanwhile a normal client is served at full speed.
        other = await post(node, "/v1/chat/completions", {**CASES[0][1], "max_tokens": 30})
        assert other.status == 200 and trio.current_time() - t0 < 1.0
        # The stalled one is cut off after the send timeout, and its work stops.
        assert await node.settle(10) == {}
        assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.5)
        assert node.worker.stats.cancels_sent == 1
        # Its connection was closed: what was in flight, then EOF.
        while await stalled.receive_some():
            pass
        nursery.cancel_scope.cancel()
