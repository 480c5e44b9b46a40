"""Sharded runners: two real runner processes joined in one mx.distributed ring over
loopback, serving the demo model pipeline-split and tensor-split."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import jsonschema
import llguidance
import pytest
import trio
from mlx_lm.utils import load_tokenizer

from exo_trio.runner.framing import encode_frame
from exo_trio.runner.protocol import (
    CancelAck,
    Loading,
    RunnerError,
    RunnerToWorker,
    Shutdown,
)
from exo_trio.runner.step_sync import FollowerChannel, Hello, LeaderChannel, Report
from exo_trio.types import (
    Cancel,
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)
from tests.runnerproc import RunnerHandle, start_runner

BANNED_EOS = {1: -1e9, 3: -1e9}  # the demo model's EOS ids
PROMPTS = {
    "a": [2, 882, 198, 72, 89, 3, 198, 2, 125, 198],
    "b": [2, 400, 198, 33, 17, 3, 198, 2, 125, 198, 55, 9],
}
SPLITS = {"pipeline": ("0:2", "2:4"), "tensor": ("0:4", "0:4")}
LONG = 1000  # tokens of the requests that are cancelled or cut short
SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "k": {"enum": ["x", "y"]},
    },
    "required": ["n", "k"],
    "additionalProperties": False,
}


def free_hostfile(directory: Path, ranks: int) -> Path:
    """A ring hostfile with one free loopback port per rank."""
    sockets = [socket.socket() for _ in range(ranks)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        hosts = [[f"127.0.0.1:{s.getsockname()[1]}"] for s in sockets]
    finally:
        for s in sockets:
            s.close()
    path = directory / "hosts.json"
    path.write_text(json.dumps(hosts))
    return path


@asynccontextmanager
async def start_group(
    model_dir: Path,
    tmp_path: Path,
    sharding: str,
    layers: tuple[str, str],
    *extra: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[list[RunnerHandle]]:
    hostfile = free_hostfile(tmp_path, 2)
    async with AsyncExitStack() as stack:
        ranks = [
            await stack.enter_async_context(
                start_runner(
                    model_dir,
                    *("--rank", str(rank), "--world-size", "2", "--hostfile", str(hostfile)),
                    *("--sharding", sharding, "--layers", layers[rank]),
                    *extra,
                    env=env,
                )
            )
            for rank in range(2)
        ]
        yield ranks


def generation(rid: str, max_tokens: int) -> TextGeneration:
    return TextGeneration(
        request_id=rid,
        model="demo",
        prompt_tokens=PROMPTS[rid[0]],
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=BANNED_EOS),
    )


async def collect(rank: RunnerHandle, rid: str, seq: int = 0) -> tuple[list[int], RunnerToWorker]:
    """Tokens of rid (from chunk `seq` on) up to its terminal event, which must be rid's."""
    tokens: list[int] = []
    while True:
        message = await rank.receive()
        assert getattr(message, "request_id", rid) == rid, message
        if isinstance(message, ChunkGenerated):
            assert message.seq == seq + len(tokens)
            tokens.append(message.token)
        else:
            return tokens, message


@pytest.fixture(scope="module")
def reference_tokens(demo_model_dir: Path) -> dict[str, list[int]]:
    """Greedy tokens from a single (world size 1) runner, each prompt alone
    ("a": LONG tokens, "b": 24)."""

    async def run() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        with trio.fail_after(60):
            async with start_runner(demo_model_dir) as runner:
                await runner.wait_ready()
                for rid in PROMPTS:
                    await runner.send(generation(rid, LONG if rid == "a" else 24))
                    out[rid], final = await collect(runner, rid)
                    assert isinstance(final, GenerationFinished), final
                await runner.send(Shutdown())
        return out

    return trio.run(run)


# On loopback the ranks share the cores, so by default a tensor-parallel step
# waits for the forward pass it queued, a pipeline step does not
# (sharded_runner._sync_steps); the other two combinations are forced.
@pytest.mark.parametrize(
    ("sharding", "step_sync"),
    [("pipeline", "auto"), ("tensor", "auto"), ("pipeline", "1"), ("tensor", "0")],
    ids=["pipeline", "tensor", "pipeline-sync", "tensor-overlap"],
)
async def test_sharded_matches_single_runner(
    sharding: str,
    step_sync: str,
    demo_model_dir: Path,
    tmp_path: Path,
    reference_tokens: dict[str, list[int]],
) -> None:
    env = {"EXO_TRIO_STEP_SYNC": step_sync}
    with trio.fail_after(90):
        async with start_group(
            demo_model_dir, tmp_path, sharding, SPLITS[sharding], env=env
        ) as ranks:
            leader, follower = ranks
            for rank in ranks:
                assert (await rank.wait_ready()).model == "demo"

            # Greedy output is token-for-token the single runner's.
            await leader.send(generation("a1", 24))
            tokens, final = await collect(leader, "a1")
            assert tokens == reference_tokens["a"][:24]
            assert isinstance(final, GenerationFinished) and final.chunks == 24

            # Two concurrent requests; one is cancelled mid-stream, the other completes
            # exactly as it would alone.
            await leader.send(generation("a2", LONG))
            await leader.send(generation("b1", 24))
            a2: list[int] = []
            b1: list[int] = []
            ack: CancelAck | None = None
            b_final: RunnerToWorker | None = None
            while b_final is None or ack is None:
                message = await leader.receive()
                if isinstance(message, ChunkGenerated) and message.request_id == "a2":
                    assert ack is None, "no chunk of a cancelled request after its ack"
                    a2.append(message.token)
                    if len(a2) == 3:
                        await leader.send(Cancel(request_id="a2"))
                elif isinstance(message, ChunkGenerated):
                    assert message.request_id == "b1" and message.seq == len(b1)
                    b1.append(message.token)
                elif isinstance(message, CancelAck):
                    assert message.request_id == "a2" and message.known
                    assert message.steps_after_cancel <= 1
                    ack = message
                else:
                    assert isinstance(message, GenerationFinished), message
                    assert message.request_id == "b1"
                    b_final = message
            assert 3 <= len(a2) < LONG
            assert a2 == reference_tokens["a"][: len(a2)]
            assert b1 == reference_tokens["b"]

            # The group keeps serving after the cancel; a3's prompt is a1's, which
            # every rank's prefix cache holds (its own layers' part): all of it but
            # the last token is reused, and the output is still the reference.
            await leader.send(generation("a3", 5))
            tokens, final = await collect(leader, "a3")
            assert tokens == reference_tokens["a"][:5]
            assert isinstance(final, GenerationFinished)
            assert final.cached_tokens == len(PROMPTS["a"]) - 1

            # Sampling without a seed: rank 0 picks one for all ranks, so they stay in
            # step (otherwise the step exchange would report diverged ranks).
            sampled = TextGeneration(
                request_id="s1",
                model="demo",
                prompt_tokens=PROMPTS["a"],
                params=SamplingParams(max_tokens=20, temperature=1.0, logit_bias=BANNED_EOS),
            )
            await leader.send(sampled)
            tokens, final = await collect(leader, "s1")
            assert isinstance(final, GenerationFinished) and len(tokens) == 20

            # A constrained request with logprobs and a penalty: every rank applies
            # the same grammar mask and processors to the same logits, so they stay
            # in step, and the output matches its schema.
            constrained = TextGeneration(
                request_id="g1",
                model="demo",
                prompt_tokens=PROMPTS["a"],
                params=SamplingParams(
                    max_tokens=80,
                    temperature=1.0,
                    logit_bias=BANNED_EOS,
                    grammar=llguidance.LLMatcher.grammar_from_json_schema(
                        SCHEMA, overrides={"whitespace_flexible": False}
                    ),
                    logprobs=2,
                    presence_penalty=0.5,
                ),
            )
            await leader.send(constrained)
            tokens, final = await collect(leader, "g1")
            assert isinstance(final, GenerationFinished) and final.finish_reason == "stop", final
            text = load_tokenizer(demo_model_dir).decode(tokens)
            jsonschema.validate(json.loads(text), SCHEMA)

            # Other ranks take no requests.
            await follower.send(generation("a4", 5))
            refused = await follower.receive()
            assert isinstance(refused, GenerationFailed) and refused.kind == "invalid"

            # Stopping rank 0 (Shutdown, or EOF) stops every rank cleanly.
            await leader.send(generation("a5", LONG))
            while not isinstance(await leader.receive(), ChunkGenerated):
                pass
            if sharding == "pipeline":
                await leader.send(Shutdown())
            else:
                await leader.stream.send_stream.aclose()
            while isinstance(final := await leader.receive(), ChunkGenerated):
                pass
            assert isinstance(final, GenerationFailed) and final.kind == "cancelled"
            with trio.fail_after(10):
                assert await leader.proc.wait() == 0
                assert await follower.proc.wait() == 0

            # Both ranks made the same cache decisions from the same requests (the
            # same lookups, hits, tokens reused and entries), each holding the
            # bytes of its own layers.
            reports = []
            for rank in ranks:
                with contextlib.suppress(StopAsyncIteration, trio.BrokenResourceError):
                    while True:
                        await rank.receive()
                assert rank.cache_stats is not None
                reports.append(rank.cache_stats)
            same = ("lookups", "hits", "tokens_reused", "entries", "evictions")
            assert [getattr(reports[0], f) for f in same] == [getattr(reports[1], f) for f in same]
            assert reports[0].hits >= 1 and all(r.bytes > 0 for r in reports)


async def test_killed_rank_fails_in_flight_requests(
    demo_model_dir: Path, tmp_path: Path, reference_tokens: dict[str, list[int]]
) -> None:
    with trio.fail_after(60):
        async with start_group(demo_model_dir, tmp_path, "pipeline", ("0:2", "2:4")) as ranks:
            leader, follower = ranks
            for rank in ranks:
                await rank.wait_ready()
            await leader.send(generation("a", LONG))
            first = await leader.receive()
            assert isinstance(first, ChunkGenerated)
            follower.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            with trio.fail_after(5):
                tokens, message = await collect(leader, "a", seq=1)
                failed_after = time.monotonic() - killed
                # Every token emitted is right: none computed from a broken collective.
                assert [first.token, *tokens] == reference_tokens["a"][: 1 + len(tokens)]
                assert len(tokens) < LONG - 1, "the request ended before the kill landed"
                assert isinstance(message, GenerationFailed), message
                assert (message.request_id, message.kind) == ("a", "runner_died")
                assert "distributed group failed" in message.message
                error = await leader.receive()
                assert isinstance(error, RunnerError)
                assert await leader.proc.wait() == 1
            print(f"kill -> failure event: {failed_after * 1000:.0f} ms")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_idle_group_does_not_spin(demo_model_dir: Path, tmp_path: Path) -> None:
    # Between steps the other ranks wait for rank 0 in a socket read, asleep; MLX's
    # ring would spin a core for as long as rank 0 is idle (~2 CPU-s over 2 s).
    # The bound is generous for a shared machine: rank 0's heartbeats cost next to
    # nothing, a spinning rank would use most of a core even when starved.
    with trio.fail_after(60):
        async with start_group(demo_model_dir, tmp_path, "pipeline", ("0:2", "2:4")) as ranks:
            leader, follower = ranks
            for rank in ranks:
                await rank.wait_ready()
            # Idle after serving, too: nothing may be left waiting in a collective.
            await leader.send(generation("a", 8))
            _, final = await collect(leader, "a")
            assert isinstance(final, GenerationFinished)
            await trio.sleep(0.5)
            before = [cpu_seconds(rank.proc.pid) for rank in ranks]
            await trio.sleep(2.0)
            used = [cpu_seconds(rank.proc.pid) - b for rank, b in zip(ranks, before, strict=True)]
            print(f"CPU over 2 s idle: rank 0 {used[0]:.2f} s, rank 1 {used[1]:.2f} s")
            assert used[1] < 0.3 and used[0] < 0.3, used
            # ... and it still serves.
            await leader.send(generation("a2", 5))
            tokens, _ = await collect(leader, "a2")
            assert len(tokens) == 5
            await leader.send(Shutdown())
            with trio.fail_after(10):
                assert await leader.proc.wait() == 0
                assert await follower.proc.wait() == 0

            # Both ranks made the same cache decisions from the same requests (the
            # same lookups, hits, tokens reused and entries), each holding the
            # bytes of its own layers.
            reports = []
            for rank in ranks:
                with contextlib.suppress(StopAsyncIteration, trio.BrokenResourceError):
                    while True:
                        await rank.receive()
                assert rank.cache_stats is not None
                reports.append(rank.cache_stats)
            same = ("lookups", "hits", "tokens_reused", "entries", "evictions")
            assert [getattr(reports[0], f) for f in same] == [getattr(reports[1], f) for f in same]
            assert reports[0].hits >= 1 and all(r.bytes > 0 for r in reports)


async def test_killed_leader_ends_idle_follower(demo_model_dir: Path, tmp_path: Path) -> None:
    # The follower sleeps in a read on rank 0's socket: rank 0's death is an EOF there.
    with trio.fail_after(60):
        async with start_group(demo_model_dir, tmp_path, "pipeline", ("0:2", "2:4")) as ranks:
            leader, follower = ranks
            for rank in ranks:
                await rank.wait_ready()
            leader.proc.send_signal(signal.SIGKILL)
            with trio.fail_after(3):
                error = await follower.receive()
                assert isinstance(error, RunnerError), error
                assert "distributed group failed" in error.message
                assert await follower.proc.wait() == 1


async def test_inconsistent_layout_is_refused(demo_model_dir: Path, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with start_group(demo_model_dir, tmp_path, "pipeline", ("0:2", "1:4")) as ranks:
            for rank in ranks:
                while isinstance(message := await rank.receive(), Loading):
                    pass
                assert isinstance(message, RunnerError), message
                assert "do not tile" in message.message
                assert await rank.proc.wait() == 1


async def test_stalled_rank_is_detected(demo_model_dir: Path, tmp_path: Path) -> None:
    # A frozen peer (as good as a link cut without a reset) never breaks the socket;
    # the watchdog ends rank 0 after --stall-timeout with an explicit failure.
    with trio.fail_after(60):
        async with start_group(
            demo_model_dir, tmp_path, "pipeline", ("0:2", "2:4"), "--stall-timeout", "2"
        ) as ranks:
            leader, follower = ranks
            for rank in ranks:
                await rank.wait_ready()
            await leader.send(generation("a", LONG))
            assert isinstance(await leader.receive(), ChunkGenerated)
            follower.proc.send_signal(signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                with trio.fail_after(8):
                    while isinstance(message := await leader.receive(), ChunkGenerated):
                        pass
                    assert isinstance(message, GenerationFailed), message
                    assert message.kind == "runner_died" and "stalled" in message.message
                    assert isinstance(await leader.receive(), RunnerError)
                    assert await leader.proc.wait() == 1
                assert time.monotonic() - stopped >= 2
            finally:
                follower.proc.send_signal(signal.SIGCONT)


async def test_group_that_never_forms_is_reported(demo_model_dir: Path, tmp_path: Path) -> None:
    # Rank 1 never starts: rank 0 waits for it inside MLX (holding the GIL) and is
    # ended by its guard process after --connect-timeout.
    hostfile = free_hostfile(tmp_path, 2)
    with trio.fail_after(30):
        async with start_runner(
            demo_model_dir,
            *("--rank", "0", "--world-size", "2", "--hostfile", str(hostfile)),
            *("--connect-timeout", "2"),
        ) as leader:
            while isinstance(message := await leader.receive(), Loading):
                pass
            assert isinstance(message, RunnerError), message
            assert "not formed within 2s" in message.message
            assert await leader.proc.wait() != 0


def test_ranks_share_host(tmp_path: Path) -> None:
    from exo_trio.runner.layer_split import Backend, ShardSpec, ranks_share_host

    def spec(rank: int, hosts: list[str], backend: Backend = "ring") -> ShardSpec:
        path = tmp_path / "hosts.json"
        path.write_text(json.dumps([[f"{h}:5000"] for h in hosts]))
        return ShardSpec(rank, len(hosts), backend, "pipeline", None, hostfile=path)

    assert ranks_share_host(spec(0, ["127.0.0.1", "127.0.0.1"]))
    assert ranks_share_host(spec(1, ["10.0.0.1", "10.0.0.2", "10.0.0.2"]))
    assert not ranks_share_host(spec(0, ["10.0.0.1", "10.0.0.2", "10.0.0.2"]))
    assert not ranks_share_host(spec(0, ["10.0.0.1", "10.0.0.1"], backend="jaccl"))


def test_layout_checks() -> None:
    from exo_trio.runner.layer_split import _layout_problem, even_split

    assert [even_split(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    pipeline, tensor = 1, 2
    assert _layout_problem([[pipeline, 0, 2, 4], [pipeline, 2, 4, 4]], "ring") is None
    # Stages may run in either ring direction.
    assert _layout_problem([[pipeline, 2, 4, 4], [pipeline, 0, 2, 4]], "ring") is None
    gap = _layout_problem([[pipeline, 0, 2, 4], [pipeline, 3, 4, 4]], "ring")
    assert gap is not None and "do not tile" in gap
    short = _layout_problem([[pipeline, 0, 2, 4], [pipeline, 2, 3, 4]], "ring")
    assert short is not None and "do not tile" in short
    # Four ranks whose stage order jumps across the ring: the ring cannot send there.
    rows = [[pipeline, 0, 1, 4], [pipeline, 2, 3, 4], [pipeline, 1, 2, 4], [pipeline, 3, 4, 4]]
    assert "ring neighbours" in (_layout_problem(rows, "ring") or "")
    assert _layout_problem(rows, "jaccl") is None
    mixed = _layout_problem([[pipeline, 0, 2, 4], [tensor, 0, 4, 4]], "ring")
    assert mixed is not None and "sharding" in mixed
    assert _layout_problem([[tensor, 0, 4, 4], [tensor, 0, 4, 4]], "ring") is None
    partial = _layout_problem([[tensor, 0, 2, 4], [tensor, 0, 4, 4]], "ring")
    assert partial is not None and "every rank" in partial
    models = _layout_problem([[pipeline, 0, 2, 4], [pipeline, 2, 6, 6]], "ring")
    assert models is not None and "layer counts" in models


# -- the step channel alone (no MLX) --------------------------------------------------


def channel_pair(stall: float = 5.0) -> tuple[LeaderChannel, FollowerChannel]:
    from exo_trio.runner.step_sync import Orders, _Peer

    lead, follow = socket.socketpair()
    leader = LeaderChannel([_Peer(lead, 1, Hello | Report)], stall_timeout=stall)
    return leader, FollowerChannel(_Peer(follow, 0, Orders), rank=1)


def test_step_channel_orders_and_reports() -> None:
    from exo_trio.runner.step_sync import StepSyncError

    leader, follower = channel_pair()
    command = generation("a", 3)
    first = leader.send_orders(commands=[command])
    orders = follower.receive(1.0)
    assert (orders.seq, orders.stop, orders.commands) == (first, False, [command])
    follower.report(orders.seq, 1234, 1.0)
    # The next orders may go out before the last exchange is confirmed.
    second = leader.send_orders()
    leader.confirm(first, 1234)
    follower.report(follower.receive(1.0).seq, 99, 1.0)
    # A rank that produced different tokens is caught before anything is emitted.
    with pytest.raises(StepSyncError, match="different tokens"):
        leader.confirm(second, 1234)


def test_step_channel_lost_and_silent_peers() -> None:
    from exo_trio.runner.step_sync import GroupStalled, PeerLost

    leader, follower = channel_pair(stall=0.3)
    seq = leader.send_orders()
    started = time.monotonic()
    with pytest.raises(GroupStalled, match="stalled"):
        leader.confirm(seq, 0)  # the follower never answers
    assert 0.3 <= time.monotonic() - started < 2
    follower.close()
    with pytest.raises(PeerLost):  # from the send or the wait, whichever notices
        leader.confirm(leader.send_orders(), 0)
    leader, follower = channel_pair()
    leader.close(linger=0)
    with pytest.raises(PeerLost):
        follower.receive(1.0)


def test_step_channel_turns_strangers_away() -> None:
    import threading

    from exo_trio.runner.step_sync import StepSyncError, _accept, _connect

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def strangers() -> None:
        with socket.create_connection(("127.0.0.1", port)) as wrong:
            wrong.sendall(encode_frame(Hello(rank=1, token=1)))  # wrong token
            assert wrong.recv(1) == b""  # turned away
        _connect("127.0.0.1", port, rank=1, token=42, deadline=time.monotonic() + 5)

    thread = threading.Thread(target=strangers)
    thread.start()
    (peer,) = _accept(listener, 2, token=42, deadline=time.monotonic() + 5)
    thread.join()
    assert peer.rank == 1
    with pytest.raises(StepSyncError, match=r"rank\(s\) \[1\] did not join"):
        _accept(listener, 2, token=42, deadline=time.monotonic() + 0.2)
    listener.close()
