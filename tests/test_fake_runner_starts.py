"""The simulator's fake runner models the engine's starts when asked (the
prompt-cache scenario): what waits when a step begins starts in it together, the
step lasts longer by the longest uncached prefill, and a prompt cache hit shortens
that prefill. Driven over its real protocol, in virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from exo_trio.runner.framing import encode_frame, read_frames
from exo_trio.runner.protocol import Ready, RunnerToWorker
from exo_trio.types import (
    ChunkGenerated,
    GenerationEvent,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)
from sim.fake_runner import FakePromptCache, FakeRunner

STEP = 0.01
PER_TOKEN = 0.001
PROMPT = list(range(100, 200))  # 100 tokens


class Steps:
    """A RunnerObserver that keeps what each step sent."""

    def __init__(self) -> None:
        self.log: list[list[GenerationEvent]] = []

    def started(self, runner: FakeRunner, command: TextGeneration) -> None:
        pass

    def sent(self, runner: FakeRunner, events: list[GenerationEvent]) -> None:
        self.log.append(list(events))

    def cancelled(self, runner: FakeRunner, request_id: str, known: bool) -> None:
        pass

    def stopped(self, runner: FakeRunner, request_ids: list[str]) -> None:
        pass

    def died(self, runner: FakeRunner, request_ids: list[str]) -> None:
        pass


def request(rid: str, prompt: list[int], max_tokens: int = 3) -> TextGeneration:
    return TextGeneration(
        request_id=rid,
        model="fake",
        prompt_tokens=prompt,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def first_step(steps: Steps, rid: str) -> int:
    return next(
        i
        for i, events in enumerate(steps.log)
        if any(isinstance(e, ChunkGenerated) and e.request_id == rid and e.seq == 0 for e in events)
    )


def test_the_fake_prompt_cache_keeps_tokens_lru_within_its_bound() -> None:
    cache = FakePromptCache(capacity=10)
    cache.store([1, 2, 3, 4])
    cache.store([5, 6, 7, 8])
    assert cache.lookup([1, 2, 3, 9]) == 3
    assert cache.lookup([1, 2, 3, 4]) == 3  # never the prompt's last token
    cache.store([9, 9, 9, 9])  # 12 tokens: the least recently used goes
    assert cache.held == 8 and cache.lookup([5, 6, 7, 8, 0]) == 0
    assert cache.lookup([1, 2, 3, 4, 0]) == 4


async def test_a_burst_starts_in_one_step_and_a_hit_shortens_the_prefill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    steps = Steps()
    runner = FakeRunner(
        theirs,
        step_delay=lambda: STEP,
        observer=steps,
        prompt_cache_tokens=1000,
        prefill_seconds_per_token=PER_TOKEN,
    )
    events: dict[str, list[RunnerToWorker]] = {}
    times: dict[str, float] = {}
    ready = trio.Event()

    async def read() -> None:
        async for message in read_frames(ours, RunnerToWorker):  # type: ignore[arg-type]
            if isinstance(message, Ready):
                ready.set()
            rid = getattr(message, "request_id", None)
            if rid is not None:
                if rid not in events:
                    times[rid] = trio.current_time()
                events.setdefault(rid, []).append(message)

    async def finished(rid: str) -> GenerationFinished:
        while not (events.get(rid) and isinstance(events[rid][-1], GenerationFinished)):
            await trio.sleep(0.001)
        final = events[rid][-1]
        assert isinstance(final, GenerationFinished)
        return final

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        nursery.start_soon(read)
        await ready.wait()

        # Three prompts sent at once (distinct, nothing cached): one step starts them
        # all, and it lasts a step plus the longest prompt's prefill.
        sent = trio.current_time()
        burst = [[i, *PROMPT[: 40 + 20 * i]] for i in range(3)]
        await ours.send_all(
            b"".join(encode_frame(request(f"b{i}", p)) for i, p in enumerate(burst))
        )
        for i in range(3):
            final = await finished(f"b{i}")
            assert final.cached_tokens == 0 and final.chunks == 3
        assert {first_step(steps, f"b{i}") for i in range(3)} == {0}
        longest = max(len(p) for p in burst)
        assert min(times.values()) - sent == pytest.approx(STEP + longest * PER_TOKEN)

        # A prompt that continues b2's conversation reuses all of it (prompt and
        # output), and prefills only what is new.
        b2_tokens = [
            e.token for e in events["b2"] if isinstance(e, ChunkGenerated)
        ]  # what b2 generated
        follow = [*burst[2], *b2_tokens, 7, 7, 7, 7]
        sent = trio.current_time()
        await ours.send_all(encode_frame(request("f1", follow)))
        final = await finished("f1")
        assert final.cached_tokens == len(burst[2]) + len(b2_tokens)
        assert times["f1"] - sent == pytest.approx(STEP + 4 * PER_TOKEN)

        # A request arriving during a step starts at the next one.
        await ours.send_all(encode_frame(request("long", [1, 2, 3], max_tokens=20)))
        while "long" not in events:
            await trio.sleep(0.001)
        await trio.sleep(STEP / 2)
        await ours.send_all(encode_frame(request("late", [4, 5, 6])))
        await finished("late")
        assert first_step(steps, "late") == first_step(steps, "long") + 2
        await finished("long")
        nursery.cancel_scope.cancel()
