"""The runner as a real OS process, spoken to over its stdin/stdout pipes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from exo_trio.runner.protocol import (
    CancelAck,
    Loading,
    Ready,
    RunnerError,
    Shutdown,
)
from exo_trio.types import (
    Cancel,
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)
from tests.runnerproc import REPO_ROOT, runner_env, start_runner

pytestmark = pytest.mark.trio

# Special token ids of the demo model (exo_trio.demo_model): EOS ids are 1 and 3.
BANNED_EOS = {1: -1e9, 3: -1e9}
PROMPT = [2, 882, 198, 72, 89, 3, 198, 2, 125, 198]


def generation(rid: str, max_tokens: int) -> TextGeneration:
    return TextGeneration(
        request_id=rid,
        model="demo",
        prompt_tokens=PROMPT,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=BANNED_EOS),
    )


async def test_loads_streams_and_exits_on_eof(demo_model_dir: Path) -> None:
    with trio.fail_after(60):
        async with start_runner(demo_model_dir, "--max-batch", "4") as runner:
            ready = await runner.wait_ready()
            assert ready == Ready(
                model="demo",
                context_length=2048,
                max_batch=4,
                pid=runner.proc.pid,
                blas=ready.blas,  # which BLAS depends on the machine (blas.py)
            )
            assert ready.blas
            loading = [m for m in runner.seen if isinstance(m, Loading)]
            assert loading, "Loading messages precede Ready"
            fractions = [m.fraction for m in loading]
            assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1

            await runner.send(generation("g", 16))
            events = await runner.until_terminal("g")
            chunks = [e for e in events if isinstance(e, ChunkGenerated)]
            assert [c.seq for c in chunks] == list(range(16))
            final = events[-1]
            assert isinstance(final, GenerationFinished)
            assert (final.finish_reason, final.chunks, final.prompt_tokens) == ("length", 16, 10)

            # Closing stdin: the runner exits 0 promptly, and its stdout ends.
            await runner.proc.stdin.aclose()  # type: ignore[union-attr]
            with trio.fail_after(10):
                assert await runner.proc.wait() == 0
            with pytest.raises(StopAsyncIteration):
                await runner.receive()


async def test_cancel_mid_stream(demo_model_dir: Path) -> None:
    with trio.fail_after(60):
        async with start_runner(demo_model_dir) as runner:
            await runner.wait_ready()
            await runner.send(generation("long", 1000))
            seqs: list[int] = []
            while len(seqs) < 3:
                message = await runner.receive()
                assert isinstance(message, ChunkGenerated)
                seqs.append(message.seq)
            await runner.send(Cancel(request_id="long"))
            # Chunks already produced may still arrive before the ack, never after.
            while True:
                message = await runner.receive()
                if isinstance(message, CancelAck):
                    break
                assert isinstance(message, ChunkGenerated) and message.request_id == "long"
                seqs.append(message.seq)
            assert message == CancelAck(
                request_id="long", steps_after_cancel=message.steps_after_cancel, known=True
            )
            assert message.steps_after_cancel <= 1
            assert seqs == list(range(len(seqs)))
            assert len(seqs) < 1000

            # The runner keeps serving, and nothing more comes for the cancelled id.
            await runner.send(generation("after", 5))
            events = await runner.until_terminal("after")
            assert all(getattr(e, "request_id", None) == "after" for e in events)
            assert isinstance(events[-1], GenerationFinished)

            # Cancelling something that already ended is acknowledged as unknown.
            await runner.send(Cancel(request_id="after"))
            assert await runner.receive() == CancelAck(
                request_id="after", steps_after_cancel=0, known=False
            )

            await runner.send(Shutdown())
            with trio.fail_after(10):
                assert await runner.proc.wait() == 0


async def test_shutdown_and_eof_fail_in_flight_requests(demo_model_dir: Path) -> None:
    with trio.fail_after(60):
        for stop in ("shutdown", "eof"):
            async with start_runner(demo_model_dir) as runner:
                await runner.wait_ready()
                await runner.send(generation("a", 1000))
                await runner.send(generation("b", 1000))
                while not isinstance(await runner.receive(), ChunkGenerated):
                    pass
                if stop == "shutdown":
                    await runner.send(Shutdown())
                else:
                    await runner.proc.stdin.aclose()  # type: ignore[union-attr]
                failed: dict[str, GenerationFailed] = {}
                while len(failed) < 2:
                    message = await runner.receive()
                    if isinstance(message, GenerationFailed):
                        failed[message.request_id] = message
                    else:
                        assert isinstance(message, ChunkGenerated)
                assert {rid: f.kind for rid, f in failed.items()} == {
                    "a": "cancelled",
                    "b": "cancelled",
                }
                with trio.fail_after(10):
                    assert await runner.proc.wait() == 0


async def test_load_failure_reports_runner_error(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with start_runner(tmp_path / "no-such-model") as runner:
            while True:
                message = await runner.receive()
                if not isinstance(message, Loading):
                    break
            assert isinstance(message, RunnerError)
            assert "no-such-model" in message.message
            with trio.fail_after(10):
                assert await runner.proc.wait() == 1


async def test_stray_prints_go_to_stderr() -> None:
    # claim_stdout() is what the runner does first: after it, a print() or any
    # other write to fd 1 must not reach the protocol pipe.
    code = (
        "import os; from exo_trio.runner.loop import claim_stdout\n"
        "fd = claim_stdout()\n"
        "print('stray print', flush=True)\n"
        "os.write(1, b'stray fd write\\n')\n"
        "os.write(fd, b'PROTOCOL')\n"
    )
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", code],
            capture_stdout=True,
            capture_stderr=True,
            cwd=REPO_ROOT,
            env=runner_env(),
        )
    assert result.stdout == b"PROTOCOL"
    assert b"stray print" in result.stderr and b"stray fd write" in result.stderr
