"""Agents' features end to end, through the official clients against a real node
with the demo model: forced tool calls and their round trip (call, result in the
history, next turn), structured output that validates against its schema,
logprobs, penalties, and the thinking switch, in every dialect, streaming and not.

The demo model has random weights: it never calls a tool or writes JSON by
itself. Forced calls and schemas are grammars, so what they produce is a valid
call or valid JSON whatever the weights: these tests show the whole path
(template, grammar in the runner, parsing, each dialect's shapes) works.
Unforced parsing of calls and thinking is tested with known text in
tests/test_chat_output.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import ollama
import openai
import pytest

from exo_trio.prompts import HFPromptEncoder
from tests.nodeproc import NodeProcess, serving

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": WEATHER_SCHEMA,
    },
}
OTHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 10},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["answer", "score", "ok"],
    "additionalProperties": False,
}
# The ollama client drops every JSON-schema keyword its Tool model does not know
# (maxLength, additionalProperties, ...): a tool whose arguments are enums stays
# bounded through it.
OLLAMA_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def node(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with serving(demo_model_dir, tmp_path_factory.mktemp("node")) as proc:
        yield proc


@pytest.fixture(scope="module")
def oai(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(node: NodeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def olla(node: NodeProcess) -> ollama.Client:
    return ollama.Client(host=node.base_url, timeout=60)


@pytest.fixture(scope="module")
def ban(eos_ban: dict[str, int]) -> dict[str, int]:
    return eos_ban


def check_weather_call(name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    assert name == "get_weather"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, WEATHER_SCHEMA)
    return args


# ---- forced tool calls and the round trip ----


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_forced_call_round_trip(
    oai: openai.OpenAI, ban: dict[str, int], stream: bool
) -> None:
    common: dict[str, Any] = {
        "model": "demo",
        "temperature": 0,
        "logit_bias": ban,
        "tools": [OPENAI_TOOL, OTHER_TOOL],
        "parallel_tool_calls": False,
    }
    choice = {"type": "function", "function": {"name": "get_weather"}}
    if stream:
        chunks = list(
            oai.chat.completions.create(
                **common, messages=ASK, tool_choice=choice, max_tokens=60, stream=True
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [tc for d in deltas for tc in d.tool_calls or []]
        assert len(calls) == 1 and calls[0].index == 0
        call_id, name = calls[0].id, calls[0].function.name
        arguments = calls[0].function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not "".join(d.content or "" for d in deltas)
    else:
        response = oai.chat.completions.create(
            **common, messages=ASK, tool_choice=choice, max_tokens=60
        )
        assert response.choices[0].finish_reason == "tool_calls"
        (call,) = response.choices[0].message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    args = check_weather_call(name, arguments)
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ]
    # The next turn: the call and its result went through the template.
    without = oai.chat.completions.create(**common, messages=ASK, max_tokens=4)
    after = oai.chat.completions.create(**common, messages=history, max_tokens=4)
    assert after.usage.prompt_tokens > without.usage.prompt_tokens + len(str(args)) // 4
    assert after.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_forced_tool_use_round_trip(
    claude: anthropic.Anthropic, ban: dict[str, int], stream: bool
) -> None:
    tool = {"name": "get_weather", "description": "The weather.", "input_schema": WEATHER_SCHEMA}
    common: dict[str, Any] = {
        "model": "demo",
        "tools": [tool],
        "extra_body": {"temperature": 0, "logit_bias": ban},
    }
    choice = {"type": "any", "disable_parallel_tool_use": True}
    if stream:
        with claude.messages.stream(
            **common, messages=ASK, tool_choice=choice, max_tokens=60
        ) as events:
            kinds = [e.type for e in events]
            message = events.get_final_message()
        assert "input_json" in kinds  # the client's view of input_json_delta
    else:
        message = claude.messages.create(**common, messages=ASK, tool_choice=choice, max_tokens=60)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    check_weather_call(use.name, use.input)
    history = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}],
        },
    ]
    after = claude.messages.create(**common, messages=history, max_tokens=4)
    assert after.stop_reason == "max_tokens" and after.content[0].type == "text"
    before = claude.messages.count_tokens(model="demo", messages=ASK, tools=[tool])
    counted = claude.messages.count_tokens(model="demo", messages=history, tools=[tool])
    # The prompt: input_tokens and what the runner's prefix cache supplied (Anthropic's
    # accounting; the first turn is cached).
    prompt = after.usage.input_tokens + (after.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == prompt > before.input_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_responses_forced_function_call_round_trip(
    oai: openai.OpenAI, ban: dict[str, int], stream: bool
) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}
    common: dict[str, Any] = {
        "model": "demo",
        "tools": [tool],
        "temperature": 0,
        "extra_body": {"logit_bias": ban},
    }
    if stream:
        with oai.responses.stream(
            **common,
            input=ASK,
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=60,
        ) as events:
            kinds = [e.type for e in events]
            response = events.get_final_response()
        assert "response.function_call_arguments.done" in kinds
    else:
        response = oai.responses.create(
            **common,
            input=ASK,
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=60,
        )
    (call,) = [item for item in response.output if item.type == "function_call"]
    check_weather_call(call.name, call.arguments)
    history: list[Any] = [
        *ASK,
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    after = oai.responses.create(**common, input=history, max_output_tokens=4)
    assert after.status == "incomplete" and after.output_text
    assert after.usage.input_tokens > response.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_forced_call_round_trip(
    olla: ollama.Client, ban: dict[str, int], stream: bool
) -> None:
    # Ollama has no tool_choice: options.tool_choice is this server's extension.
    options = {
        "temperature": 0,
        "num_predict": 60,
        "logit_bias": ban,
        "tool_choice": "get_weather",
        "parallel_tool_calls": False,
    }
    if stream:
        parts = list(
            olla.chat(model="demo", messages=ASK, tools=[OLLAMA_TOOL], options=options, stream=True)
        )
        calls = [c for p in parts for c in p.message.tool_calls or []]
        assert parts[-1].done and parts[-1].done_reason == "stop"
    else:
        reply = olla.chat(model="demo", messages=ASK, tools=[OLLAMA_TOOL], options=options)
        calls = list(reply.message.tool_calls or [])
    (call,) = calls
    assert call.function.name == "get_weather"
    jsonschema.validate(call.function.arguments, OLLAMA_TOOL["function"]["parameters"])
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    after = olla.chat(
        model="demo",
        messages=history,
        tools=[OLLAMA_TOOL],
        options={"temperature": 0, "num_predict": 4, "logit_bias": ban},
    )
    assert after.done_reason == "length" and after.message.content


def test_parallel_calls_and_a_named_tool_that_is_not_there(
    oai: openai.OpenAI, ban: dict[str, int]
) -> None:
    response = oai.chat.completions.create(
        model="demo",
        messages=ASK,
        tools=[OPENAI_TOOL, OTHER_TOOL],
        tool_choice="required",
        max_tokens=120,
        temperature=0,
        logit_bias=ban,
    )
    calls = response.choices[0].message.tool_calls or []
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        schema = (
            WEATHER_SCHEMA
            if call.function.name == "get_weather"
            else (
                OTHER_TOOL["function"]["parameters"]  # type: ignore[index]
            )
        )
        jsonschema.validate(json.loads(call.function.arguments), schema)
    with pytest.raises(openai.BadRequestError) as missing:
        oai.chat.completions.create(
            model="demo",
            messages=ASK,
            tools=[OPENAI_TOOL],
            max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert missing.value.param == "tool_choice"


# ---- structured output ----


@pytest.mark.parametrize("stream", [False, True])
def test_openai_json_schema_output_validates(
    oai: openai.OpenAI, ban: dict[str, int], stream: bool
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}
    kwargs: dict[str, Any] = {
        "model": "demo",
        "messages": ASK,
        "max_tokens": 80,
        "temperature": 0,
        "logit_bias": ban,
        "response_format": fmt,
    }
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in oai.chat.completions.create(**kwargs, stream=True)
            if c.choices
        )
    else:
        response = oai.chat.completions.create(**kwargs)
        assert response.choices[0].finish_reason == "stop"
        text = response.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    # Any JSON object: a random model's keys and strings are unbounded, so the
    # object is only whole if it ended before max_tokens; it is always one's prefix.
    whole = oai.chat.completions.create(**{**kwargs, "response_format": {"type": "json_object"}})
    content = whole.choices[0].message.content or ""
    assert content.startswith("{")
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_and_anthropic_and_ollama_schemas_validate(
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    olla: ollama.Client,
    ban: dict[str, int],
    stream: bool,
) -> None:
    fmt = {"format": {"type": "json_schema", "name": "a", "schema": ANSWER_SCHEMA}}
    if stream:
        with oai.responses.stream(
            model="demo",
            input=ASK,
            text=fmt,
            max_output_tokens=80,
            temperature=0,
            extra_body={"logit_bias": ban},
        ) as events:
            text = events.get_final_response().output_text
    else:
        text = oai.responses.create(
            model="demo",
            input=ASK,
            text=fmt,
            max_output_tokens=80,
            temperature=0,
            extra_body={"logit_bias": ban},
        ).output_text
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)

    config = {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}
    extra = {"temperature": 0, "logit_bias": ban}
    if stream:
        with claude.messages.stream(
            model="demo", messages=ASK, max_tokens=80, output_config=config, extra_body=extra
        ) as events:
            text = events.get_final_text()
    else:
        message = claude.messages.create(
            model="demo", messages=ASK, max_tokens=80, output_config=config, extra_body=extra
        )
        text = message.content[0].text  # type: ignore[union-attr]
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)

    options = {"temperature": 0, "num_predict": 80, "logit_bias": ban}
    if stream:
        text = "".join(
            p.message.content or ""
            for p in olla.chat(
                model="demo", messages=ASK, format=ANSWER_SCHEMA, options=options, stream=True
            )
        )
        raw = "".join(
            p.response or ""
            for p in olla.generate(
                model="demo", prompt="json", format="json", options=options, stream=True
            )
        )
    else:
        text = (
            olla.chat(
                model="demo", messages=ASK, format=ANSWER_SCHEMA, options=options
            ).message.content
            or ""
        )
        raw = olla.generate(model="demo", prompt="json", format="json", options=options).response
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    assert raw.startswith("{")


def test_a_schema_the_engine_cannot_compile_is_a_400_naming_it(
    oai: openai.OpenAI, claude: anthropic.Anthropic, olla: ollama.Client
) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError) as chat:
        oai.chat.completions.create(
            model="demo",
            messages=ASK,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )
    assert chat.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as responses:
        oai.responses.create(
            model="demo",
            input="x",
            max_output_tokens=4,
            text={"format": {"type": "json_schema", "name": "x", "schema": bad}},
        )
    assert responses.value.param == "text.format.schema"
    with pytest.raises(anthropic.BadRequestError, match=r"output_config\.format\.schema"):
        claude.messages.create(
            model="demo",
            messages=ASK,
            max_tokens=4,
            output_config={"format": {"type": "json_schema", "schema": bad}},
        )
    with pytest.raises(ollama.ResponseError, match="format") as err:
        olla.chat(model="demo", messages=ASK, format=bad)
    assert err.value.status_code == 400
    tool = {"type": "function", "function": {"name": "f", "parameters": bad}}
    with pytest.raises(openai.BadRequestError) as tools:
        oai.chat.completions.create(
            model="demo", messages=ASK, max_tokens=4, tools=[tool], tool_choice="required"
        )
    assert tools.value.param == "tools"


# ---- logprobs ----


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_top_entry_is_the_sampled_token_under_greedy(
    oai: openai.OpenAI, olla: ollama.Client, ban: dict[str, int], stream: bool
) -> None:
    n = 8
    kwargs: dict[str, Any] = {
        "model": "demo",
        "messages": ASK,
        "max_tokens": n,
        "temperature": 0,
        "logit_bias": ban,
        "logprobs": True,
        "top_logprobs": 5,
    }
    if stream:
        entries = [
            e
            for c in oai.chat.completions.create(**kwargs, stream=True)
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content or []
        ]
    else:
        entries = oai.chat.completions.create(**kwargs).choices[0].logprobs.content or []
    assert len(entries) == n
    for entry in entries:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token

    completion = oai.completions.create(
        model="demo",
        prompt="Once upon",
        max_tokens=n,
        temperature=0,
        logit_bias=ban,
        logprobs=3,
        stream=stream,
    )
    if stream:
        lp = [c.choices[0].logprobs for c in completion if c.choices[0].logprobs]
        tokens = [t for p in lp for t in p.tokens]
        values = [v for p in lp for v in p.token_logprobs]
        tops = [t for p in lp for t in p.top_logprobs]
    else:
        lp = completion.choices[0].logprobs
        tokens, values, tops = lp.tokens, lp.token_logprobs, lp.top_logprobs
    assert len(tokens) == n
    for token, value, top in zip(tokens, values, tops, strict=True):
        best = max(top, key=top.get)
        assert best == token and top[best] == pytest.approx(value)

    options = {"temperature": 0, "num_predict": n, "logit_bias": ban}
    if stream:
        parts = list(
            olla.chat(
                model="demo",
                messages=ASK,
                options=options,
                logprobs=True,
                top_logprobs=2,
                stream=True,
            )
        )
        logprobs = [lp for p in parts for lp in p.logprobs or []]
    else:
        logprobs = list(
            olla.chat(
                model="demo", messages=ASK, options=options, logprobs=True, top_logprobs=2
            ).logprobs
            or []
        )
    assert len(logprobs) == n
    assert all(lp.top_logprobs[0].token == lp.token for lp in logprobs)


def test_responses_logprobs(oai: openai.OpenAI, ban: dict[str, int]) -> None:
    response = oai.responses.create(
        model="demo",
        input=ASK,
        max_output_tokens=6,
        temperature=0,
        top_logprobs=3,
        include=["message.output_text.logprobs"],
        extra_body={"logit_bias": ban},
    )
    logprobs = response.output[0].content[0].logprobs  # type: ignore[union-attr]
    assert len(logprobs) == 6
    assert all(lp.top_logprobs[0].token == lp.token for lp in logprobs)


# ---- penalties and thinking ----


def test_a_penalty_changes_greedy_output(
    oai: openai.OpenAI, olla: ollama.Client, ban: dict[str, int]
) -> None:
    # A penalty changes greedy output only where it would repeat a token: this
    # prompt's greedy output does (a penalty-free run repeats itself).
    repeat = [{"role": "user", "content": "repeat after me: the the the the"}]
    kwargs: dict[str, Any] = {
        "model": "demo",
        "messages": repeat,
        "max_tokens": 40,
        "temperature": 0,
        "logit_bias": ban,
    }
    plain = oai.chat.completions.create(**kwargs).choices[0].message.content
    presence = oai.chat.completions.create(**kwargs, presence_penalty=2.0)
    frequency = oai.chat.completions.create(**kwargs, frequency_penalty=2.0)
    assert presence.choices[0].message.content != plain
    assert frequency.choices[0].message.content != plain
    options = {"temperature": 0, "num_predict": 40, "logit_bias": ban}
    same = olla.chat(model="demo", messages=repeat, options=options).message.content
    penalised = olla.chat(
        model="demo", messages=repeat, options={**options, "repeat_penalty": 1.8}
    ).message.content
    assert same == plain and penalised != plain


def test_thinking_switches_and_the_budget(
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    olla: ollama.Client,
    ban: dict[str, int],
    demo_model_dir: Path,
) -> None:
    encoder = HFPromptEncoder(demo_model_dir)
    on, off = (len(encoder.chat_tokens(ASK, thinking=t)) for t in (True, False))
    assert off > on  # the template closes an empty thinking block when off
    chat = oai.chat.completions.create(
        model="demo", messages=ASK, max_tokens=1, reasoning_effort="none", logit_bias=ban
    )
    assert chat.usage.prompt_tokens == off
    default = claude.messages.create(model="demo", messages=ASK, max_tokens=1)
    # Anthropic's default: no thinking (the prompt: input and cache-read tokens).
    assert default.usage.input_tokens + (default.usage.cache_read_input_tokens or 0) == off
    think = olla.chat(
        model="demo", messages=ASK, think=False, options={"num_predict": 1, "logit_bias": ban}
    )
    assert think.prompt_eval_count == off
    # With thinking on and a budget, the runner closes the section after it: the
    # bias makes the model open one (a random model would not think by itself).
    bias = {**ban, str(encoder.chat_format.think_start_id): 40}
    message = claude.messages.create(
        model="demo",
        messages=ASK,
        max_tokens=16,
        thinking={"type": "enabled", "budget_tokens": 5},
        extra_body={"temperature": 0, "logit_bias": bias},
    )
    assert message.content[0].type == "thinking"
    assert message.content[0].thinking == "<think>" * 5
