"""No silent drops: every request field the official clients define is either
honoured or refused with a 400 naming it.

The fields come from the clients themselves (the `openai` and `anthropic`
packages' typed request params, the `ollama` package's request models), so a
client release that adds a field fails this test until api/fields.py says what
the field does here. Each field is then sent, with a valid value, through the
real app (in process, a fake runner behind it): a refused field must get a 400
that names it, any other must be accepted. Unknown fields are refused too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from exo_trio.api.fields import FIELDS
from fuzz.http1 import build_request, exchange
from fuzz.inproc import InProcessNode
from sim.encoder import SimEncoder


def client_fields() -> dict[str, set[str]]:
    import anthropic.types.message_create_params as messages
    from ollama._types import ChatRequest, GenerateRequest, Options
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat
    from openai.types.responses import response_create_params as responses

    return {
        "POST /v1/chat/completions": set(chat.CompletionCreateParamsStreaming.__annotations__),
        "POST /v1/completions": set(completions.CompletionCreateParamsStreaming.__annotations__),
        "POST /v1/responses": set(responses.ResponseCreateParamsStreaming.__annotations__),
        "POST /v1/messages": set(messages.MessageCreateParamsStreaming.__annotations__),
        "POST /api/chat": set(ChatRequest.model_fields),
        "POST /api/generate": set(GenerateRequest.model_fields),
        "options (Ollama)": set(Options.model_fields),
    }


TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}

# A valid value for each field, and the body it goes into.
BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "POST /v1/chat/completions": (
        "/v1/chat/completions",
        {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ),
    "POST /v1/completions": ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 4}),
    "POST /v1/responses": (
        "/v1/responses",
        {"model": "demo", "input": "hi", "max_output_tokens": 4},
    ),
    "POST /v1/messages": (
        "/v1/messages",
        {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ),
    "POST /api/chat": (
        "/api/chat",
        {
            "model": "demo",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"num_predict": 4},
        },
    ),
    "POST /api/generate": (
        "/api/generate",
        {"model": "demo", "prompt": "hi", "stream": False, "options": {"num_predict": 4}},
    ),
    "options (Ollama)": (
        "/api/generate",
        {"model": "demo", "prompt": "hi", "stream": False, "options": {"num_predict": 4}},
    ),
}
SAMPLES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "function_call": "auto",
    "functions": [TOOL["function"]],
    "logit_bias": {"5": 1.0},
    "logprobs": True,
    "top_logprobs": 2,
    "max_completion_tokens": 4,
    "max_tokens": 4,
    "metadata": {"k": "v"},
    "modalities": ["text"],
    "moderation": {"type": "x"},
    "n": 1,
    "best_of": 1,
    "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "x"},
    "prompt_cache_key": "k",
    "prompt_cache_options": {"x": 1},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "none",
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
    "safety_identifier": "s",
    "seed": 3,
    "service_tier": "auto",
    "stop": ["zz"],
    "store": False,
    "stream": False,
    "stream_options": {"include_usage": True},
    "temperature": 0.5,
    "tool_choice": "auto",
    "tools": [TOOL],
    "top_p": 0.9,
    "user": "u",
    "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
    "echo": True,
    "suffix": "tail",
    "access_programs": ["x"],
    "background": True,
    "background_options": {"x": 1},
    "context_management": [{"type": "x"}],
    "conversation": "conv_1",
    "image": {"x": 1},
    "include": ["message.output_text.logprobs"],
    "instructions": "be brief",
    "max_output_tokens": 4,
    "max_tool_calls": 2,
    "previous_response_id": "resp_1",
    "prompt": {"id": "p"},
    "reasoning": {"effort": "none"},
    "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}},
    "truncation": "disabled",
    "cache_control": {"type": "ephemeral"},
    "container": "c1",
    "diagnostics": {"x": 1},
    "inference_geo": "us",
    "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
    "speed": "standard",
    "stop_sequences": ["zz"],
    "system": "be brief",
    "thinking": {"type": "adaptive"},
    "user_profile_id": "u",
    "workspace_id": "w",
    "format": SCHEMA,
    "keep_alive": "5m",
    "think": False,
    "context": [1, 2],
    "images": ["aGk="],
    "raw": True,
    "template": "{{ .Prompt }}",
    "width": 8,
    "height": 8,
    "steps": 2,
}
# Where a dialect spells a field's value its own way, or a field needs another.
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "POST /v1/chat/completions": {"top_logprobs": {"logprobs": True, "top_logprobs": 2}},
    "POST /v1/completions": {"logprobs": {"logprobs": 2}},
    "POST /v1/responses": {
        "tools": {"tools": [{"type": "function", "name": "f", "parameters": SCHEMA}]},
    },
    "POST /v1/messages": {
        "tools": {"tools": [{"name": "f", "input_schema": SCHEMA}]},
        "tool_choice": {"tool_choice": {"type": "auto"}},
        # The fake model's markers are text, not tokens: a budget is refused for
        # it (tested end to end with the demo model), "adaptive" has none.
        "thinking": {"thinking": {"type": "adaptive"}},
    },
    "POST /api/chat": {"top_logprobs": {"logprobs": True, "top_logprobs": 2}},
    "POST /api/generate": {"top_logprobs": {"logprobs": True, "top_logprobs": 2}},
}
OPTION_SAMPLES: dict[str, Any] = {
    "num_predict": 4,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "min_p": 0.1,
    "seed": 1,
    "stop": ["zz"],
    "repeat_penalty": 1.1,
    "repeat_last_n": 32,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "num_ctx": 2048,
    "num_batch": 8,
    "num_gpu": 1,
    "main_gpu": 0,
    "use_mmap": True,
    "num_thread": 2,
    "num_keep": 4,
    "numa": True,
    "low_vram": True,
    "use_mlock": True,
    "f16_kv": True,
    "vocab_only": True,
    "embedding_only": True,
    "logits_all": True,
    "typical_p": 0.5,
    "tfs_z": 0.5,
    "mirostat": 1,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "penalize_newline": True,
}


def test_every_client_field_is_in_the_table() -> None:
    for endpoint, fields in client_fields().items():
        missing = fields - set(FIELDS[endpoint])
        assert not missing, (
            f"{endpoint}: fields the client defines, not in api/fields.py: {missing}"
        )


def cases() -> list[tuple[str, str]]:
    return [(endpoint, field) for endpoint, fields in client_fields().items() for field in fields]


def body_with(endpoint: str, field: str) -> tuple[str, dict[str, Any]]:
    path, base = BASES[endpoint]
    body = json.loads(json.dumps(base))
    if endpoint == "options (Ollama)":
        body["options"][field] = OPTION_SAMPLES[field]
    elif field in OVERRIDES.get(endpoint, {}):
        body.update(OVERRIDES[endpoint][field])
    elif field not in body:  # fields of the base body keep their value
        body[field] = SAMPLES[field]
    return path, body


async def test_each_field_is_honoured_or_refused_by_name(autojump_clock: Any) -> None:
    table_of = dict(FIELDS)
    async with trio.open_nursery() as nursery:
        node = await InProcessNode.start(nursery, SimEncoder(), context_length=4096)
        problems = []
        for endpoint, field in cases():
            path, body = body_with(endpoint, field)
            raw = build_request(
                "POST", path, [("Content-Type", "application/json")], json.dumps(body).encode()
            )
            response = await exchange(node.connect(), raw)
            status = table_of[endpoint][field][0]
            text = response.body.decode(errors="replace")
            if status == "refused":
                if response.status != 400 or field not in text:
                    problems.append(f"{endpoint} {field}: refused, got {response.status} {text}")
            elif response.status != 200:
                problems.append(f"{endpoint} {field}: {status}, got {response.status} {text}")
        nursery.cancel_scope.cancel()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "demo", "messages": [], "invented": 1}),
        ("/v1/completions", {"model": "demo", "prompt": "x", "invented": 1}),
        ("/v1/responses", {"model": "demo", "input": "x", "invented": 1}),
        ("/v1/messages", {"model": "demo", "max_tokens": 1, "messages": [], "invented": 1}),
        ("/api/chat", {"model": "demo", "invented": 1}),
        ("/api/generate", {"model": "demo", "options": {"invented": 1}}),
    ],
)
async def test_an_unknown_field_is_a_400_naming_it(
    autojump_clock: Any, path: str, body: dict[str, Any]
) -> None:
    async with trio.open_nursery() as nursery:
        node = await InProcessNode.start(nursery, SimEncoder(), context_length=4096)
        raw = build_request(
            "POST", path, [("Content-Type", "application/json")], json.dumps(body).encode()
        )
        response = await exchange(node.connect(), raw)
        nursery.cancel_scope.cancel()
    assert response.status == 400
    assert "invented" in response.body.decode()


def test_docs_list_every_field_as_the_code_does() -> None:
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    for endpoint, table in FIELDS.items():
        section = docs.split(f"#### {endpoint}\n", 1)[1].split("\n#### ", 1)[0]
        for field, (status, _) in table.items():
            assert f"| `{field}` | {status} |" in section, f"docs/api.md: {endpoint} {field}"
