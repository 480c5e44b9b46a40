"""Per-request sampling in the engine: grammars, logprobs, penalties, thinking.

Each rule is checked on every path a request can take through the engine: alone
(the lone-request decoder), started beside a running request (the direct start,
then BatchGenerator with its cache), and in a burst that BatchGenerator prefills
itself; and a constrained request beside unconstrained ones must not change them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import llguidance
import pytest

from exo_trio.demo_model import THINK_END_TOKEN_ID, THINK_START_TOKEN_ID
from exo_trio.runner.engine import Engine
from exo_trio.runner.guide import Guide, Thinking, Verdict
from exo_trio.types import (
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
    ThinkingControl,
)
from tests.test_engine import ban_eos, chat_prompt, check_stream, request, run_until_done

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["a", "b", "c"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "kind", "ok"],
    "additionalProperties": False,
}


def schema_grammar(schema: dict[str, object] = SCHEMA) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(
        schema, overrides={"whitespace_flexible": False}
    )


@pytest.fixture
def engine(demo_model_dir: Path) -> Iterator[Engine]:
    eng = Engine.load(demo_model_dir, "demo", max_batch=8)
    yield eng
    eng.fail_all("cancelled", "test teardown")


def text_of(events: list) -> tuple[str, GenerationFinished]:
    _, text, final = check_stream(events)
    return text, final


def alone(engine: Engine, cmd: TextGeneration) -> list:
    assert engine.submit(cmd) == []
    return run_until_done(engine)[cmd.request_id]


# ---- grammars ----


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_a_schema_constrained_request_alone_gives_valid_json(
    engine: Engine, ignore_eos: bool
) -> None:
    # EOS is banned with a bias (as tests do for exact lengths): the grammar's
    # end still ends the request, and EOS is never output.
    cmd = request(
        engine,
        "g",
        chat_prompt(engine, "json please"),
        200,
        grammar=schema_grammar(),
        ignore_eos=ignore_eos,
    )
    text, final = text_of(alone(engine, cmd))
    jsonschema.validate(json.loads(text), SCHEMA)
    assert final.finish_reason == "stop"


def test_constrained_requests_in_a_batch_each_follow_their_own_grammar(engine: Engine) -> None:
    # One lone, then two joining (direct start), then a burst of three that
    # BatchGenerator prefills itself; free requests beside them are unchanged.
    free_prompt = chat_prompt(engine, "free text")
    free_alone = check_stream(alone(engine, request(engine, "solo", free_prompt, 30)))[0]
    other = {"type": "array", "items": {"type": "integer", "maximum": 9}, "maxItems": 3}
    early: list = []
    engine.submit(request(engine, "free", free_prompt, 30))
    early += engine.step()
    commands = [
        request(engine, "g1", chat_prompt(engine, "one"), 120, grammar=schema_grammar()),
        request(engine, "g2", chat_prompt(engine, "two"), 120, grammar=schema_grammar(other)),
    ]
    for cmd in commands:
        assert engine.submit(cmd) == []
    early += engine.step()
    burst = [
        request(engine, f"b{i}", chat_prompt(engine, f"burst {i}"), 120, grammar=schema_grammar())
        for i in range(3)
    ]
    for cmd in burst:
        assert engine.submit(cmd) == []
    results = run_until_done(engine)
    for event in reversed(early):
        results[event.request_id].insert(0, event)
    for rid in ("g1", "b0", "b1", "b2"):
        text, _final = text_of(results[rid])
        jsonschema.validate(json.loads(text), SCHEMA)
    text, _ = text_of(results["g2"])
    jsonschema.validate(json.loads(text), other)
    assert check_stream(results["free"])[0][: len(free_alone)] == free_alone


def test_a_grammar_the_runner_cannot_compile_fails_the_request(engine: Engine) -> None:
    cmd = request(engine, "bad", chat_prompt(engine, "x"), 10, grammar="start: ( unclosed")
    (failed,) = engine.submit(cmd)
    assert isinstance(failed, GenerationFailed) and failed.kind == "invalid"
    assert "grammar" in failed.message
    assert not engine.has_work


def test_a_rejected_token_ends_the_request_with_an_error() -> None:
    # A matcher that refuses everything: the guide says so and stays ended.
    class Refusing:
        def consume_token(self, token: int) -> bool:
            return False

        def get_error(self) -> str:
            return "no"

    guide = Guide(Refusing(), vocab_size=16, eos_ids=frozenset({1}))
    assert guide.accept(0, 5) is Verdict.REJECTED
    assert guide.accept(0, 5) is Verdict.REJECTED  # the same token again: same verdict
    assert guide.error == "no"


# ---- thinking ----


def test_a_thinking_budget_closes_the_thinking_section(engine: Engine) -> None:
    # The prompt opened the section; after 5 tokens the budget forces its end.
    prompt = [*chat_prompt(engine, "think"), THINK_START_TOKEN_ID]
    thinking = ThinkingControl(
        start=THINK_START_TOKEN_ID, end=THINK_END_TOKEN_ID, inside=True, budget=5
    )
    tokens, _, _ = check_stream(alone(engine, request(engine, "t", prompt, 12, thinking=thinking)))
    assert tokens[5] == THINK_END_TOKEN_ID
    assert THINK_END_TOKEN_ID not in tokens[:5]


def test_a_constrained_request_may_think_first_then_follows_its_grammar(engine: Engine) -> None:
    # Thinking allowed: the guide lets the start token through besides the grammar,
    # keeps the grammar off inside, and the budget ends the section.
    thinking = ThinkingControl(start=THINK_START_TOKEN_ID, end=THINK_END_TOKEN_ID, budget=4)
    bias = {**ban_eos(engine), THINK_START_TOKEN_ID: 50.0}  # make it think
    cmd = request(
        engine,
        "tg",
        chat_prompt(engine, "think, then json"),
        200,
        grammar=schema_grammar(),
        thinking=thinking,
        logit_bias=bias,
    )
    tokens, text, final = check_stream(alone(engine, cmd))
    assert tokens[0] == THINK_START_TOKEN_ID and tokens[5] == THINK_END_TOKEN_ID
    body = text.split("</think>", 1)[1]
    jsonschema.validate(json.loads(body), SCHEMA)
    assert final.finish_reason == "stop"


def test_the_guide_feeds_each_token_once_whoever_comes_first() -> None:
    consumed: list[int] = []

    class Recording:
        def consume_token(self, token: int) -> bool:
            consumed.append(token)
            return True

        def is_stopped(self) -> bool:
            return False

    guide = Guide(
        Recording(),
        vocab_size=16,
        eos_ids=frozenset({1}),
        thinking=Thinking(start=4, end=5, inside=False),
    )
    assert guide.accept(0, 4) is Verdict.CONTINUE  # thinking starts
    assert guide.accept(0, 4) is Verdict.CONTINUE
    for position, token in enumerate([9, 9, 5, 7, 8], start=1):
        assert guide.accept(position, token) is Verdict.CONTINUE
    assert guide.thought == 2
    assert consumed == [7, 8]  # only the body reaches the grammar


# ---- logprobs ----


@pytest.mark.parametrize("path", ["alone", "joining"])
def test_greedy_logprobs_top_entry_is_the_sampled_token(engine: Engine, path: str) -> None:
    if path == "joining":
        engine.submit(request(engine, "other", chat_prompt(engine, "busy"), 40))
        assert len(engine.step()) == 1
    cmd = request(engine, "lp", chat_prompt(engine, "logprobs"), 12, logprobs=5)
    engine.submit(cmd)
    events = run_until_done(engine)["lp"]
    chunks = [e for e in events if isinstance(e, ChunkGenerated)]
    assert len(chunks) == 12
    for chunk in chunks:
        assert chunk.logprob is not None and chunk.logprob.token == chunk.token
        assert len(chunk.top_logprobs) == 5
        assert chunk.top_logprobs[0].token == chunk.token
        assert chunk.top_logprobs[0].logprob == pytest.approx(chunk.logprob.logprob)
        values = [t.logprob for t in chunk.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert chunk.logprob.raw.decode("utf-8", "replace")  # the token's own bytes


def test_logprobs_under_a_grammar_list_only_allowed_tokens(engine: Engine) -> None:
    cmd = request(
        engine, "lpg", chat_prompt(engine, "x"), 80, grammar=schema_grammar(), logprobs=20
    )
    chunks = [e for e in alone(engine, cmd) if isinstance(e, ChunkGenerated)]
    assert chunks[0].text == "{"
    # The first token can only be "{" (or a token starting with it): masked ones
    # are not listed, and what is listed sums to at most probability 1.
    assert all(t.raw.startswith(b"{") for t in chunks[0].top_logprobs)


# ---- penalties and filters ----


@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.5},
        {"repeat_penalty": 1.8, "repeat_last_n": 64},
    ],
)
def test_a_penalty_changes_greedy_output(engine: Engine, penalty: dict[str, float]) -> None:
    prompt = chat_prompt(engine, "repeat after me: the the the the")
    plain = check_stream(alone(engine, request(engine, "p0", prompt, 40)))[0]
    penalised = check_stream(alone(engine, request(engine, "p1", prompt, 40, **penalty)))[0]
    assert penalised != plain
    # The output penalties act on the output only: the first token, drawn before
    # any output exists, is the same (the repeat penalty also sees the prompt).
    if "repeat_penalty" not in penalty:
        assert penalised[0] == plain[0]
        assert len(set(penalised)) >= len(set(plain))


def test_penalties_in_a_batch_apply_per_request(engine: Engine) -> None:
    prompt = chat_prompt(engine, "same prompt")
    plain = check_stream(alone(engine, request(engine, "a", prompt, 30)))[0]
    penalised = check_stream(alone(engine, request(engine, "b", prompt, 30, presence_penalty=2.0)))[
        0
    ]
    engine.submit(request(engine, "x", prompt, 30))
    engine.submit(request(engine, "y", prompt, 30, presence_penalty=2.0))
    results = run_until_done(engine)
    assert check_stream(results["x"])[0] == plain
    assert check_stream(results["y"])[0] == penalised


def test_min_p_one_keeps_only_the_top_token(engine: Engine) -> None:
    # min_p = 1 keeps only tokens as likely as the best: sampling is then greedy.
    prompt = chat_prompt(engine, "min p")
    greedy = check_stream(alone(engine, request(engine, "g", prompt, 20)))[0]
    sampled = check_stream(
        alone(engine, request(engine, "s", prompt, 20, temperature=1.5, seed=3, min_p=1.0))
    )[0]
    assert sampled == greedy


def test_out_of_range_sampling_parameters_are_refused(engine: Engine) -> None:
    prompt = chat_prompt(engine, "x")
    for params in ({"min_p": 2.0}, {"logprobs": 21}, {"repeat_penalty": -1.0}):
        cmd = TextGeneration(
            request_id="bad",
            model="demo",
            prompt_tokens=prompt,
            params=SamplingParams(max_tokens=4, **params),  # type: ignore[arg-type]
        )
        (failed,) = engine.submit(cmd)
        assert isinstance(failed, GenerationFailed) and failed.kind == "invalid"


def test_a_tokenizer_llguidance_cannot_read_leaves_the_runner_without_grammars() -> None:
    from exo_trio.runner.sampling import GrammarTokenizer

    broken = GrammarTokenizer(object(), 16)  # not a Hugging Face fast tokenizer
    with pytest.raises(ValueError, match="cannot be used for grammars"):
        broken.matcher(schema_grammar())
