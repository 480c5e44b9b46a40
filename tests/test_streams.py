"""The streams registry: registration, exact delivery, counting of orphans."""

from __future__ import annotations

import pytest
import trio

from exo_trio.streams import StreamRegistry, StreamViolation
from exo_trio.types import ChunkGenerated, GenerationFailed, GenerationFinished


def chunk(rid: str, seq: int) -> ChunkGenerated:
    return ChunkGenerated(request_id=rid, seq=seq, token=seq, text=f"{seq} ")


def finished(rid: str, chunks: int) -> GenerationFinished:
    return GenerationFinished(
        request_id=rid,
        chunks=chunks,
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=chunks,
    )


async def test_every_event_a_request_can_produce_fits_without_a_reader() -> None:
    registry = StreamRegistry()
    stream = registry.open("r1", max_tokens=50)
    # The runner may produce everything before the client reads anything.
    for seq in range(50):
        assert registry.deliver(chunk("r1", seq))
    assert registry.deliver(finished("r1", 50))
    got = [event async for event in stream]
    assert [e.seq for e in got[:-1]] == list(range(50))  # type: ignore[union-attr]
    assert isinstance(got[-1], GenerationFinished)
    assert stream.finished


async def test_events_for_unknown_and_closed_requests_are_counted_not_lost() -> None:
    registry = StreamRegistry()
    assert not registry.deliver(chunk("never-opened", 0))
    assert registry.statistics().unknown_events == 1
    registry.open("r2", max_tokens=4)
    registry.close("r2")
    assert not registry.deliver(chunk("r2", 0))
    assert registry.statistics().late_events == 1
    assert registry.statistics().unknown_events == 1
    assert len(registry) == 0


async def test_nothing_may_follow_a_terminal_event() -> None:
    registry = StreamRegistry()
    registry.open("r3", max_tokens=4)
    registry.deliver(GenerationFailed(request_id="r3", kind="runner_died", message="x"))
    assert not registry.deliver(chunk("r3", 0))
    assert registry.statistics().after_terminal == 1


@pytest.mark.parametrize("bad_seq", [1, 0])  # a gap, then a duplicate
async def test_a_gap_or_duplicate_is_detected_by_the_reader(bad_seq: int) -> None:
    registry = StreamRegistry()
    stream = registry.open("r4", max_tokens=4)
    registry.deliver(chunk("r4", 0))
    registry.deliver(chunk("r4", bad_seq + 1 if bad_seq else 0))
    await stream.receive()
    with pytest.raises(StreamViolation):
        await stream.receive()


async def test_terminal_event_must_account_for_every_chunk() -> None:
    registry = StreamRegistry()
    stream = registry.open("r5", max_tokens=4)
    registry.deliver(chunk("r5", 0))
    registry.deliver(finished("r5", 2))
    await stream.receive()
    with pytest.raises(StreamViolation):
        await stream.receive()


async def test_duplicate_open_is_refused_and_close_is_idempotent() -> None:
    registry = StreamRegistry()
    registry.open("r6", max_tokens=1)
    with pytest.raises(ValueError):
        registry.open("r6", max_tokens=1)
    registry.close("r6")
    registry.close("r6")
    assert registry.statistics().closed == 1


async def test_a_blocked_reader_is_woken_by_delivery() -> None:
    registry = StreamRegistry()
    stream = registry.open("r7", max_tokens=1)
    got = []

    async def reader() -> None:
        got.extend([event async for event in stream])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.01)
        registry.deliver(chunk("r7", 0))
        registry.deliver(finished("r7", 1))
    assert len(got) == 2
