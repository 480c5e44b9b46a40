"""Engine: the synchronous MLX core, checked against mlx-lm's own generation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors

from exo_trio.runner import engine as engine_module
from exo_trio.runner import solo
from exo_trio.runner.engine import Engine
from exo_trio.runner.prefill import Row
from exo_trio.types import (
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
    is_terminal,
)


@pytest.fixture
def engine(demo_model_dir: Path) -> Iterator[Engine]:
    # Loading the demo model takes a few tens of milliseconds: a fresh engine per
    # test keeps tests independent (no leftover requests, steps counter at 0).
    eng = Engine.load(demo_model_dir, "demo", max_batch=8)
    yield eng
    eng.fail_all("cancelled", "test teardown")


def chat_prompt(engine: Engine, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def ban_eos(engine: Engine) -> dict[int, float]:
    # Random weights may pick EOS at any step; banning it gives exact lengths.
    return {t: -1e9 for t in engine.eos_token_ids}


def request(
    engine: Engine, rid: str, prompt: list[int], max_tokens: int, **params: object
) -> TextGeneration:
    params.setdefault("temperature", 0.0)
    params.setdefault("logit_bias", ban_eos(engine))
    return TextGeneration(
        request_id=rid,
        model="demo",
        prompt_tokens=prompt,
        params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
    )


def run_until_done(engine: Engine, max_steps: int = 500) -> dict[str, list[GenerationEvent]]:
    """Step until no work is left; events grouped by request id."""
    by_id: dict[str, list[GenerationEvent]] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return by_id
        for event in engine.step():
            by_id.setdefault(event.request_id, []).append(event)
    raise AssertionError("engine did not finish")


def check_stream(events: list[GenerationEvent]) -> tuple[list[int], str, GenerationFinished]:
    """Assert the per-request contract; return (tokens, full text, terminal event)."""
    chunks = [e for e in events if isinstance(e, ChunkGenerated)]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert events[:-1] == chunks, "exactly one terminal event, last"
    final = events[-1]
    assert isinstance(final, GenerationFinished)
    assert final.chunks == final.completion_tokens == len(chunks)
    return [c.token for c in chunks], "".join(c.text for c in chunks) + final.text, final


def reference(
    engine: Engine, prompt: list[int], max_tokens: int, logit_bias: dict[int, float] | None
) -> tuple[list[int], str, str]:
    """Greedy tokens, text and finish reason from mlx-lm's own stream_generate."""
    responses = list(
        stream_generate(
            engine.model,
            engine.tokenizer,
            mx.array(prompt),
            max_tokens=max_tokens,
            logits_processors=make_logits_processors(logit_bias=logit_bias),
        )
    )
    finish = responses[-1].finish_reason
    assert finish is not None
    # On EOS the last response carries the EOS token, which is not part of the output.
    tokens = [r.token for r in (responses[:-1] if finish == "stop" else responses)]
    return tokens, "".join(r.text for r in responses), finish


def test_exact_length_with_eos_banned(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Count to twenty.")
    assert engine.submit(request(engine, "a", prompt, 20)) == []
    assert engine.active == {"a"}
    events = run_until_done(engine)["a"]
    tokens, _, final = check_stream(events)
    assert len(tokens) == 20
    assert final.finish_reason == "length"
    assert final.prompt_tokens == len(prompt)
    assert engine.active == frozenset()


@pytest.mark.parametrize(
    ("text", "banned"),
    [
        ("Tell me a story about a fox.", True),
        # Greedy output for this prompt hits EOS after ~27 tokens with the demo model.
        ("why?", False),
    ],
)
def test_greedy_matches_mlx_lm(engine: Engine, text: str, banned: bool) -> None:
    prompt = chat_prompt(engine, text)
    bias = ban_eos(engine) if banned else {}
    engine.submit(request(engine, "a", prompt, 64, logit_bias=bias))
    tokens, text, final = check_stream(run_until_done(engine)["a"])
    ref_tokens, ref_text, ref_finish = reference(engine, prompt, 64, bias or None)
    assert tokens == ref_tokens
    # Same streaming detokenizer on both sides, so the same first-token space trim.
    assert text == ref_text
    assert final.finish_reason == ref_finish
    if banned:
        assert ref_finish == "length"
        assert len(set(tokens)) > 10, "demo model output should vary"
    else:
        assert ref_finish == "stop", "pick a prompt whose greedy output reaches EOS"


def test_eos_ends_with_stop_and_is_not_emitted(engine: Engine) -> None:
    prompt = chat_prompt(engine, "hi")
    eos = min(engine.eos_token_ids)
    engine.submit(request(engine, "a", prompt, 10, logit_bias={eos: 1e9}))
    (final,) = run_until_done(engine)["a"]
    assert isinstance(final, GenerationFinished)
    assert (final.finish_reason, final.chunks, final.completion_tokens) == ("stop", 0, 0)


def test_ignore_eos_emits_eos_tokens(engine: Engine) -> None:
    prompt = chat_prompt(engine, "hi")
    eos = min(engine.eos_token_ids)
    engine.submit(request(engine, "a", prompt, 4, logit_bias={eos: 1e9}, ignore_eos=True))
    tokens, _, final = check_stream(run_until_done(engine)["a"])
    assert tokens == [eos] * 4
    assert final.finish_reason == "length"


def test_second_request_joins_running_batch(engine: Engine) -> None:
    a_prompt = chat_prompt(engine, "first")
    b_prompt = chat_prompt(engine, "second, a little longer")
    engine.submit(request(engine, "a", a_prompt, 60))
    a_chunks = 0
    while a_chunks < 3:
        a_chunks += sum(isinstance(e, ChunkGenerated) for e in engine.step())
    engine.submit(request(engine, "b", b_prompt, 5))
    # A decoded alone until now (solo.py): the next step emits A's token in flight,
    # hands A to the batch, prefills B and emits B's first token ...
    events = engine.step()
    assert [(e.request_id, type(e)) for e in events] == [
        ("a", ChunkGenerated),
        ("b", ChunkGenerated),
    ]
    # ... then one step moves both into the decoding batch (BatchGenerator returns
    # a sequence's tokens from the call after the one that inserts it), and from
    # then on A decodes one chunk per step with B alongside.
    assert engine.step() == []
    for _ in range(3):
        assert sum(e.request_id == "a" for e in engine.step()) == 1
    # A one-token prompt starts directly too.
    engine.submit(request(engine, "c", [b_prompt[-1]], 5))
    assert [e.request_id for e in engine.step()] == ["c"]
    by_id = run_until_done(engine)
    assert by_id["b"][-1] == GenerationFinished(
        request_id="b",
        chunks=5,
        finish_reason="length",
        prompt_tokens=len(b_prompt),
        completion_tokens=5,
        text=by_id["b"][-1].text,  # type: ignore[union-attr]
    )
    assert isinstance(by_id["a"][-1], GenerationFinished)


def test_batch_limit_queues_extra_requests(demo_model_dir: Path) -> None:
    engine = Engine.load(demo_model_dir, "demo", max_batch=2)
    prompt = chat_prompt(engine, "queue")
    for rid in "abc":
        engine.submit(request(engine, rid, prompt, 6))
    first_chunk_step: dict[str, int] = {}
    by_id: dict[str, list[GenerationEvent]] = {}
    while engine.has_work:
        for e in engine.step():
            first_chunk_step.setdefault(e.request_id, engine.steps)
            by_id.setdefault(e.request_id, []).append(e)
    assert first_chunk_step["c"] > first_chunk_step["a"] + 5, "c waits for a free slot"
    results = {rid: check_stream(by_id[rid]) for rid in "abc"}
    # Same prompt, greedy: same output whether batched now or queued for later...
    assert results["a"][0] == results["b"][0] == results["c"][0]
    # ... or started directly (a lone arrival is; a burst of three was not).
    engine.submit(request(engine, "d", prompt, 6))
    assert check_stream(run_until_done(engine)["d"])[0] == results["a"][0]


def test_cancel_frees_slot_and_silences_request(demo_model_dir: Path) -> None:
    engine = Engine.load(demo_model_dir, "demo", max_batch=1)
    prompt = chat_prompt(engine, "cancel me")
    engine.submit(request(engine, "a", prompt, 200))
    engine.submit(request(engine, "b", prompt, 5))
    for _ in range(6):
        assert all(e.request_id == "a" for e in engine.step()), "b waits: one slot"
    assert engine.active == {"a", "b"}
    assert engine.cancel("a") is True
    assert engine.active == {"b"}
    assert engine.cancel("a") is False
    assert engine.cancel("never-seen") is False
    by_id = run_until_done(engine, max_steps=20)
    assert set(by_id) == {"b"}, "no events for a cancelled request"
    assert check_stream(by_id["b"])[2].finish_reason == "length"


def test_cancel_while_queued_or_prefilling(engine: Engine) -> None:
    prompt = chat_prompt(engine, "quick")
    engine.submit(request(engine, "queued", prompt, 5))
    assert engine.cancel("queued")
    assert not engine.has_work
    engine.submit(request(engine, "prefilling", prompt, 5))
    engine.step()  # prompt processed, not yet decoding
    assert engine.cancel("prefilling")
    engine.submit(request(engine, "next", prompt, 5))
    assert set(run_until_done(engine)) == {"next"}


def test_stop_string_ends_with_stop(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Say something long.")
    engine.submit(request(engine, "full", prompt, 40))
    _, full_text, _ = check_stream(run_until_done(engine)["full"])
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 4]
    assert len(stop) == 4
    engine.submit(request(engine, "stopped", prompt, 40, stop=(stop,)))
    tokens, text, final = check_stream(run_until_done(engine)["stopped"])
    assert final.finish_reason == "stop"
    assert text == full_text[: full_text.index(stop)]
    assert len(tokens) < 40
    assert engine.active == frozenset()


def test_held_back_text_is_flushed_at_length(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Say something long.")
    engine.submit(request(engine, "full", prompt, 12))
    _, full_text, _ = check_stream(run_until_done(engine)["full"])
    # A stop that starts with the last characters but never completes: they are
    # held back through the last chunk and released with GenerationFinished.
    stop = full_text[-2:] + "\x00"
    engine.submit(request(engine, "held", prompt, 12, stop=(stop,)))
    _, text, final = check_stream(run_until_done(engine)["held"])
    assert final.finish_reason == "length"
    assert text == full_text
    assert final.text.endswith(full_text[-2:])


def test_seeded_sampling_is_reproducible_alone_or_batched(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Random story please.")
    other = chat_prompt(engine, "Something else entirely, with a longer prompt than the first.")

    def seeded(rid: str, seed: int = 1234) -> TextGeneration:
        return request(engine, rid, prompt, 24, temperature=1.0, top_p=0.95, seed=seed)

    engine.submit(seeded("alone"))
    alone = check_stream(run_until_done(engine)["alone"])[0]

    # Submitted together with an unseeded request (prefilled in one padded batch).
    engine.submit(request(engine, "noise1", other, 30, temperature=1.5))
    engine.submit(seeded("together"))
    together = check_stream(run_until_done(engine)["together"])[0]

    # Joining while another request is already decoding.
    engine.submit(request(engine, "noise2", other, 40, temperature=0.7))
    for _ in range(5):
        engine.step()
    engine.submit(seeded("joined"))
    joined = check_stream(run_until_done(engine)["joined"])[0]

    assert alone == together == joined
    engine.submit(seeded("other-seed", seed=99))
    assert check_stream(run_until_done(engine)["other-seed"])[0] != alone


@pytest.mark.parametrize(
    ("prompt", "changes"),
    [
        ([], {}),
        ([5] * 2000, {"max_tokens": 49}),  # 2000 + 49 > 2048 context
        ([5, 2048], {}),  # vocab is 2048
        ([5, -1], {}),
        ([5], {"max_tokens": 0}),
        ([5], {"top_p": 0.0}),
        ([5], {"temperature": -1.0}),
        ([5], {"logit_bias": {4096: 1.0}}),
    ],
)
def test_invalid_requests(engine: Engine, prompt: list[int], changes: dict[str, object]) -> None:
    params: dict[str, object] = {"max_tokens": 5, **changes}
    max_tokens = params.pop("max_tokens")
    cmd = request(engine, "bad", prompt, max_tokens, **params)  # type: ignore[arg-type]
    (event,) = engine.submit(cmd)
    assert isinstance(event, GenerationFailed)
    assert (event.request_id, event.kind) == ("bad", "invalid")
    assert not engine.has_work
    assert engine.step() == []


def test_duplicate_request_id_is_refused(engine: Engine) -> None:
    engine.submit(request(engine, "a", [5, 6], 5))
    (event,) = engine.submit(request(engine, "a", [5, 6], 5))
    assert isinstance(event, GenerationFailed) and event.kind == "invalid"
    assert check_stream(run_until_done(engine)["a"])[2].chunks == 5


def test_step_failure_fails_in_flight_and_recovers(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = chat_prompt(engine, "boom")
    engine.submit(request(engine, "a", prompt, 20))
    engine.submit(request(engine, "b", prompt, 20))
    engine.step()
    broken = engine._generator

    def explode() -> object:
        raise RuntimeError("simulated MLX failure")

    monkeypatch.setattr(broken, "next", explode)
    events = engine.step()
    assert sorted(e.request_id for e in events) == ["a", "b"]
    assert all(isinstance(e, GenerationFailed) and e.kind == "internal" for e in events)
    assert all(is_terminal(e) for e in events)
    assert not engine.has_work
    assert engine._generator is not broken
    engine.submit(request(engine, "c", prompt, 5))
    assert check_stream(run_until_done(engine)["c"])[2].finish_reason == "length"


def test_a_failed_prefill_fails_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request started directly whose prefill raises (an allocation failure on a
    huge prompt, say) ends alone with an error; the request already decoding goes
    on to its exact end."""
    engine.submit(request(engine, "a", chat_prompt(engine, "first"), 30))
    events = engine.step()
    real_prefill = engine_module.prefill_rows

    def prefill_rows(model: object, rows: list[Row], **kwargs: Any) -> None:
        if any(row.prompt == doomed for row in rows):
            raise MemoryError("simulated allocation failure")
        real_prefill(model, rows, **kwargs)

    doomed = chat_prompt(engine, "a prompt too big to fit")
    monkeypatch.setattr(engine_module, "prefill_rows", prefill_rows)
    engine.submit(request(engine, "b", doomed, 30))
    events += engine.step()
    failed = [e for e in events if e.request_id == "b"]
    assert len(failed) == 1 and isinstance(failed[0], GenerationFailed)
    assert failed[0].kind == "internal" and "prefill failed" in failed[0].message
    by_id = run_until_done(engine)
    assert "b" not in by_id
    tokens, _, final = check_stream([*(e for e in events if e.request_id == "a"), *by_id["a"]])
    assert final.finish_reason == "length" and len(tokens) == 30


def test_a_lone_request_decoding_solo_cancels_and_ends_cleanly(engine: Engine) -> None:
    """The solo path (a request alone decodes outside BatchGenerator, solo.py):
    cancelled mid-way it stops at once; max_tokens=1 ends in its first step; and
    the engine serves the next request exactly as mlx-lm would."""
    prompt = chat_prompt(engine, "Tell me a story about a fox.")
    engine.submit(request(engine, "long", prompt, 200))
    seen = 0
    while seen < 5:
        seen += sum(isinstance(e, ChunkGenerated) for e in engine.step())
    assert engine.cancel("long") is True
    assert not engine.has_work and engine.step() == []
    engine.submit(request(engine, "one", prompt, 1))
    (chunk, final) = engine.step()
    assert isinstance(chunk, ChunkGenerated) and isinstance(final, GenerationFinished)
    assert final.finish_reason == "length" and final.completion_tokens == 1
    assert not engine.has_work
    engine.submit(request(engine, "again", prompt, 12))
    tokens, _, _ = check_stream(run_until_done(engine)["again"])
    assert tokens == reference(engine, prompt, 12, ban_eos(engine))[0]


def test_a_lone_request_probes_pipelining_without_changing_its_tokens(engine: Engine) -> None:
    """A lone request's decoder times a few steps with and a few without queueing
    the next pass ahead (solo.py); both ways compute the same tokens as mlx-lm."""
    prompt = chat_prompt(engine, "Tell me a story about a fox.")
    engine.submit(request(engine, "a", prompt, 40))
    modes, events = [], []
    while engine.has_work:
        events.extend(engine.step())
        if engine._solo is not None:
            modes.append(engine._solo[1].pipelined)
    assert True in modes and False in modes, "the probe tried both ways"
    tokens, _, _ = check_stream(events)
    assert tokens == reference(engine, prompt, 40, ban_eos(engine))[0]


def test_joining_an_unpipelined_lone_request_starts_at_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When pipelining does not pay, nothing is computing between steps: a request
    arriving then is prefilled in the very next step (its first token is that
    step's only event) and the lone one moves into the batch without a gap."""
    monkeypatch.setattr(solo, "PIPELINE_MIN_GAIN", math.inf)  # the probe says "no"
    a_prompt = chat_prompt(engine, "first")
    engine.submit(request(engine, "a", a_prompt, 60))
    events: list[GenerationEvent] = []
    while len(events) < 2 * solo.PROBE_STEPS + solo.WARMUP + 2:
        events.extend(engine.step())
    assert engine._solo is not None and not engine._solo[1].pipelined
    engine.submit(request(engine, "b", chat_prompt(engine, "second"), 5))
    joined = engine.step()
    assert [(e.request_id, type(e)) for e in joined] == [("b", ChunkGenerated)]
    by_id = run_until_done(engine)
    check_stream(events + by_id["a"])
    assert len(check_stream(joined + by_id["b"])[0]) == 5
