"""The worker against a fake runner speaking the real protocol over memory streams."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio
import trio.testing

from exo_trio.node import ModelCard, Node
from exo_trio.seams import Seams
from exo_trio.streams import StreamRegistry
from exo_trio.types import (
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)
from exo_trio.worker import RunnerUnavailable, Worker
from sim.fake_runner import FakeRunner


@dataclass
class FakeConnection:
    stream: trio.abc.Stream
    pid: int | None = None

    async def aclose(self) -> None:
        await self.stream.aclose()


class Harness:
    """Launches FakeRunners in a nursery; keeps them so a test can kill one."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.runners: list[FakeRunner] = []
        self.scopes: list[trio.CancelScope] = []

    async def launch(self) -> FakeConnection:
        ours, theirs = trio.testing.memory_stream_pair()
        runner = FakeRunner(theirs, step_delay=lambda: 0.001)
        scope = trio.CancelScope()
        self.runners.append(runner)
        self.scopes.append(scope)

        async def run() -> None:
            with scope:
                await runner.run()
            await theirs.aclose()  # a killed runner's pipe ends

        self.nursery.start_soon(run)
        return FakeConnection(ours)


def command(rid: str, max_tokens: int) -> TextGeneration:
    return TextGeneration(
        request_id=rid,
        model="fake",
        prompt_tokens=[1, 2, 3],
        params=SamplingParams(max_tokens=max_tokens),
    )


async def start(nursery: trio.Nursery) -> tuple[Node, Harness]:
    harness = Harness(nursery)
    registry = StreamRegistry()
    worker = Worker(harness.launch, registry, restart_backoff=0.01)
    node = Node(
        model=ModelCard(id="fake", context_length=4096, created=0),
        encoder=None,  # type: ignore[arg-type]
        worker=worker,
        registry=registry,
        seams=Seams(),
    )
    nursery.start_soon(worker.run)
    await worker.wait_ready()
    return node, harness


async def test_a_request_streams_every_chunk_then_finishes() -> None:
    async with trio.open_nursery() as nursery:
        node, _ = await start(nursery)
        with node.open_generation(command("a", 20)) as stream:
            events = [event async for event in stream]
        assert [e.seq for e in events if isinstance(e, ChunkGenerated)] == list(range(20))
        assert isinstance(events[-1], GenerationFinished) and events[-1].finish_reason == "length"
        assert len(node.registry) == 0 and not node.local_worker().jobs
        nursery.cancel_scope.cancel()


async def test_leaving_early_cancels_the_runner_work() -> None:
    async with trio.open_nursery() as nursery:
        node, harness = await start(nursery)
        with node.open_generation(command("b", 1000)) as stream:
            await stream.receive()
        # The runner acknowledges the cancel; nothing is left anywhere.
        with trio.fail_after(1):
            while node.local_worker().jobs:
                await trio.sleep(0.001)
        assert node.local_worker().stats.cancel_acks == 1
        assert not harness.runners[0].active
        assert len(node.registry) == 0
        nursery.cancel_scope.cancel()


async def test_a_dead_runner_fails_its_requests_and_is_restarted() -> None:
    async with trio.open_nursery() as nursery:
        node, harness = await start(nursery)
        streams = []
        with (
            node.open_generation(command("c1", 1000)) as s1,
            node.open_generation(command("c2", 1000)) as s2,
        ):
            await s1.receive()
            harness.scopes[0].cancel()  # the runner dies mid-stream
            with trio.fail_after(1):
                for stream in (s1, s2):
                    streams.append([event async for event in stream])
        for events in streams:
            assert isinstance(events[-1], GenerationFailed)
            assert events[-1].kind == "runner_died"
        with trio.fail_after(1):
            await node.local_worker().wait_ready()
            while not node.local_worker().ready:
                await trio.sleep(0.001)
        assert len(harness.runners) == 2
        with node.open_generation(command("c3", 5)) as stream:
            events = [event async for event in stream]
        assert isinstance(events[-1], GenerationFinished)
        nursery.cancel_scope.cancel()


async def test_submit_without_a_ready_runner_is_refused_and_leaves_nothing() -> None:
    registry = StreamRegistry()

    async def never_launches() -> FakeConnection:
        await trio.sleep_forever()
        raise AssertionError

    worker = Worker(never_launches, registry)
    node = Node(
        model=ModelCard(id="fake", context_length=4096, created=0),
        encoder=None,  # type: ignore[arg-type]
        worker=worker,
        registry=registry,
        seams=Seams(),
    )
    with pytest.raises(RunnerUnavailable):
        with node.open_generation(command("d", 5)):
            pass
    assert len(registry) == 0


class FailingLoads:
    """A launcher whose runners send RunnerError before Ready, `failures` times,
    then behave (a FakeRunner); counts the launches."""

    def __init__(self, nursery: trio.Nursery, failures: int, permanent: bool) -> None:
        self.harness = Harness(nursery)
        self.failures = failures
        self.permanent = permanent
        self.launches = 0

    async def launch(self) -> FakeConnection:
        from exo_trio.runner.framing import encode_frame
        from exo_trio.runner.protocol import RunnerError

        self.launches += 1
        if self.launches > self.failures:
            return await self.harness.launch()
        ours, theirs = trio.testing.memory_stream_pair()
        error = RunnerError(message="loading failed: ValueError: nope", permanent=self.permanent)
        await theirs.send_all(encode_frame(error))
        await theirs.aclose()
        return FakeConnection(ours)


async def run_worker(loads: FailingLoads, settle: float = 5.0) -> Worker:
    worker = Worker(loads.launch, lambda event: None, restart_backoff=0.01, max_backoff=0.05)
    with trio.move_on_after(settle):
        await worker.run()
    return worker


@pytest.mark.parametrize(("failures", "permanent"), [(1, True), (100, False)])
async def test_a_runner_that_cannot_load_is_given_up_on(
    autojump_clock: trio.testing.MockClock, failures: int, permanent: bool
) -> None:
    async with trio.open_nursery() as nursery:
        loads = FailingLoads(nursery, failures, permanent)
        worker = await run_worker(loads)  # returns by itself: it gave up
        nursery.cancel_scope.cancel()
    assert loads.launches == (1 if permanent else 3)
    assert worker.state == "failed" and worker.gave_up is not None
    assert "cannot be loaded" in worker.gave_up and "nope" in worker.gave_up
    assert worker.unavailable_reason().endswith("not restarting it")


async def test_two_failed_loads_then_a_good_one_serve(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        loads = FailingLoads(nursery, 2, permanent=False)
        worker = Worker(loads.launch, lambda event: None, restart_backoff=0.01)
        nursery.start_soon(worker.run)
        await worker.wait_ready()
        assert loads.launches == 3 and worker.gave_up is None
        # A crash after a healthy run restarts, however often it happens.
        for _ in range(4):
            loads.harness.scopes[-1].cancel()
            while worker.state == "ready":
                await trio.sleep(0.001)
            while worker.state != "ready":
                await trio.sleep(0.01)
        assert worker.gave_up is None and worker.stats.restarts == 6
        nursery.cancel_scope.cancel()


class BreakingInput(trio.abc.Stream):
    """The worker's end of a runner pipe whose input (worker to runner) can be made
    to break, as a dying runner's does, while what the runner wrote is held until
    released (still in the pipe when the write fails)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.broken = False
        self.released = trio.Event()
        self.released.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            raise trio.BrokenResourceError("the runner's input closed")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        await self.released.wait()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_output_written_before_the_runner_input_broke_is_still_read() -> None:
    """Found by the single-node simulator (mutant worker_drops_output): a write to a
    dying runner failed and cancelled the whole session at once, so the chunks the
    runner had written just before were never read."""
    pipes: list[BreakingInput] = []

    async with trio.open_nursery() as nursery:
        harness = Harness(nursery)

        async def launch() -> FakeConnection:
            connection = await harness.launch()
            pipe = BreakingInput(connection.stream)
            pipes.append(pipe)
            return FakeConnection(pipe)

        registry = StreamRegistry()
        worker = Worker(launch, registry, restart_backoff=0.01)
        node = Node(
            model=ModelCard(id="fake", context_length=4096, created=0),
            encoder=None,  # type: ignore[arg-type]
            worker=worker,
            registry=registry,
            seams=Seams(),
        )
        nursery.start_soon(worker.run)
        await worker.wait_ready()
        pipe = pipes[0]
        pipe.released = trio.Event()  # hold what the runner writes from now on
        with node.open_generation(command("a", 5)) as stream:
            await trio.sleep(0.2)  # the runner wrote all of "a" (5 steps of 1 ms)
            assert not harness.runners[0].active
            pipe.broken = True
            with node.open_generation(command("b", 5)):  # its write fails
                await trio.sleep(0.01)
                pipe.released.set()
                with trio.fail_after(5):
                    events = [event async for event in stream]
        assert [e.seq for e in events if isinstance(e, ChunkGenerated)] == list(range(5))
        assert isinstance(events[-1], GenerationFinished)
        nursery.cancel_scope.cancel()
