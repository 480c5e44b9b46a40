"""End to end, every dialect against a real node with the demo model, driven by
its official client: `openai` (chat completions, completions, responses),
`anthropic` (messages), `ollama` (chat, generate, catalogue). Raw httpx only
where a client hides what is checked (headers, exact error bodies).

EOS is banned with logit_bias (an extension in the Anthropic, Responses and
Ollama dialects) so lengths are exact; a +100 bias on an EOS id forces an
immediate EOS to check the "stop" mappings.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exo_trio.prompts import HFPromptEncoder
from tests.nodeproc import NodeProcess, serving

SYSTEM = "You are terse."
USER = "Tell me about trio nurseries."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
N = 24


@pytest.fixture(scope="module")
def node(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with serving(demo_model_dir, tmp_path_factory.mktemp("node"), "--keepalive", "0.05") as proc:
        yield proc


@pytest.fixture(scope="module")
def encoder(demo_model_dir: Path) -> HFPromptEncoder:
    return HFPromptEncoder(demo_model_dir)


@pytest.fixture(scope="module")
def ban(eos_ban: dict[str, int]) -> dict[str, int]:
    return eos_ban


@pytest.fixture(scope="module")
def force_eos(encoder: HFPromptEncoder) -> dict[str, int]:
    return {str(encoder.eos_token_ids[0]): 100}


@pytest.fixture(scope="module")
def oai(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(node: NodeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def olla(node: NodeProcess) -> ollama.Client:
    return ollama.Client(host=node.base_url, timeout=60)


def rendered_chat_prompt(model_dir: Path) -> str:
    """The chat template applied to MESSAGES, as text (for raw-prompt endpoints)."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert isinstance(text, str)
    return text


def test_every_generation_endpoint_gives_the_same_greedy_text(
    node: NodeProcess,
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    olla: ollama.Client,
    ban: dict[str, int],
    encoder: HFPromptEncoder,
    demo_model_dir: Path,
) -> None:
    prompt_tokens = len(encoder.chat_tokens(MESSAGES))
    greedy = {"temperature": 0, "logit_bias": ban}
    options = {"num_predict": N, **greedy}
    texts: dict[str, str] = {}

    chat = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=N, **greedy)  # type: ignore[arg-type]
    texts["chat"] = chat.choices[0].message.content or ""
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (prompt_tokens, N)

    resp = oai.responses.create(
        model="demo",
        instructions=SYSTEM,
        input=USER,
        max_output_tokens=N,
        temperature=0,
        extra_body={"logit_bias": ban},
    )
    texts["responses"] = resp.output_text
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (prompt_tokens, N)
    # The same prompt again: all of it but its last token comes from the runner's
    # prefix cache, and the text is the same (checked below) token for token.
    assert resp.usage.input_tokens_details.cached_tokens == prompt_tokens - 1

    msg = claude.messages.create(
        model="demo",
        system=SYSTEM,
        messages=[{"role": "user", "content": USER}],
        max_tokens=N,
        # Anthropic's default is no thinking (the template then closes an empty
        # thinking block); the other dialects' default is the template's: on.
        thinking={"type": "adaptive"},
        # This anthropic client has no temperature argument; the API still takes it.
        extra_body={"temperature": 0, "logit_bias": ban},
    )
    texts["messages"] = "".join(b.text for b in msg.content if b.type == "text")
    # Anthropic counts cached prompt tokens apart from input_tokens.
    assert (msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (prompt_tokens - 1, N)
    assert msg.usage.input_tokens == 1 and msg.usage.cache_creation_input_tokens == 0

    ochat = olla.chat(model="demo", messages=MESSAGES, options=options)
    texts["ollama chat"] = ochat.message.content or ""
    assert (ochat.prompt_eval_count, ochat.eval_count) == (prompt_tokens, N)

    # Not raw: Ollama applies the chat template to (system, prompt).
    gen = olla.generate(model="demo", system=SYSTEM, prompt=USER, options=options)
    texts["ollama generate"] = gen.response
    assert (gen.prompt_eval_count, gen.eval_count) == (prompt_tokens, N)

    # The raw-prompt endpoints get the rendered template as text. That is only the
    # same prompt if the text tokenizes to the same ids: check that first.
    rendered = rendered_chat_prompt(demo_model_dir)
    assert encoder.text_tokens(rendered) == encoder.chat_tokens(MESSAGES)
    legacy = oai.completions.create(model="demo", prompt=rendered, max_tokens=N, **greedy)  # type: ignore[arg-type]
    texts["completions"] = legacy.choices[0].text
    assert legacy.usage is not None and legacy.usage.prompt_tokens == prompt_tokens
    assert legacy.usage.prompt_tokens_details is not None
    assert legacy.usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    texts["ollama generate raw"] = olla.generate(
        model="demo", prompt=rendered, raw=True, options=options
    ).response

    bench = httpx.post(
        f"{node.base_url}/bench/chat/completions",
        json={"model": "demo", "messages": MESSAGES, "max_tokens": N, **greedy},
        timeout=30,
    ).json()
    texts["bench"] = bench["choices"][0]["message"]["content"]

    assert len(set(texts.values())) == 1, texts
    assert len(texts["chat"]) > N / 2  # real text, not an empty agreement


def test_completions_stream_and_echo(oai: openai.OpenAI, ban: dict[str, int]) -> None:
    kwargs = {"model": "demo", "prompt": "def nursery(", "max_tokens": 12, "temperature": 0}
    whole = oai.completions.create(**kwargs, logit_bias=ban)  # type: ignore[call-overload]
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    chunks = list(
        oai.completions.create(
            **kwargs, logit_bias=ban, stream=True, stream_options={"include_usage": True}
        )  # type: ignore[call-overload]
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    echoed = oai.completions.create(**kwargs, logit_bias=ban, echo=True)  # type: ignore[call-overload]
    assert echoed.choices[0].text == "def nursery(" + whole.choices[0].text
    default_length = oai.completions.create(model="demo", prompt="x", logit_bias=ban)
    assert default_length.usage is not None and default_length.usage.completion_tokens == 16


def test_responses_stream_events_and_statuses(
    oai: openai.OpenAI, ban: dict[str, int], force_eos: dict[str, int]
) -> None:
    kwargs = {"model": "demo", "input": [{"role": "user", "content": USER}], "temperature": 0}
    whole = oai.responses.create(**kwargs, max_output_tokens=10, extra_body={"logit_bias": ban})  # type: ignore[call-overload]
    assert whole.status == "incomplete"
    assert whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    events = list(
        oai.responses.create(  # type: ignore[call-overload]
            **kwargs, max_output_tokens=10, stream=True, extra_body={"logit_bias": ban}
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == whole.output_text and final.usage.output_tokens == 10
    eos = oai.responses.create(**kwargs, max_output_tokens=10, extra_body={"logit_bias": force_eos})  # type: ignore[call-overload]
    assert eos.status == "completed" and eos.output_text == ""
    assert eos.usage is not None and eos.usage.output_tokens == 0


def test_anthropic_messages_stream_and_stop_reasons(
    claude: anthropic.Anthropic, ban: dict[str, int], force_eos: dict[str, int]
) -> None:
    kwargs = {
        "model": "demo",
        "system": [{"type": "text", "text": SYSTEM}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": USER}]}],
    }
    greedy = {"temperature": 0, "logit_bias": ban}
    whole = claude.messages.create(**kwargs, max_tokens=16, extra_body=greedy)  # type: ignore[call-overload]
    text = whole.content[0].text  # type: ignore[union-attr]
    assert whole.type == "message" and whole.role == "assistant"
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 16

    raw = list(
        claude.messages.create(**kwargs, max_tokens=16, stream=True, extra_body=greedy)  # type: ignore[call-overload]
    )
    kinds = [e.type for e in raw]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    # message_start counts the whole prompt as input; the final usage splits off what
    # the runner's prefix cache supplied (Anthropic's cache_read_input_tokens).
    prompt = raw[0].message.usage.input_tokens  # type: ignore[union-attr]
    end = raw[-2].usage  # type: ignore[union-attr]
    assert end.input_tokens + end.cache_read_input_tokens == prompt  # type: ignore[operator]
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens == prompt  # type: ignore[operator]
    assert end.cache_read_input_tokens == prompt - 1  # the same prompt again: cached
    assert raw[-2].delta.stop_reason == "max_tokens" and end.output_tokens == 16  # type: ignore[union-attr]
    assert "".join(e.delta.text for e in raw if e.type == "content_block_delta") == text  # type: ignore[union-attr]

    with claude.messages.stream(
        **kwargs, max_tokens=16, extra_body={"temperature": 0, "logit_bias": ban}
    ) as s:  # type: ignore[arg-type]
        final = s.get_final_message()
    assert final.content[0].text == text and final.stop_reason == "max_tokens"  # type: ignore[union-attr]

    stop = text[6:10]
    assert stop.strip(), text
    stopped = claude.messages.create(
        **kwargs, max_tokens=16, stop_sequences=[stop, "never-there"], extra_body=greedy
    )  # type: ignore[call-overload]
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]

    eos = claude.messages.create(**kwargs, max_tokens=16, extra_body={"logit_bias": force_eos})  # type: ignore[call-overload]
    assert eos.stop_reason == "end_turn" and eos.stop_sequence is None
    assert eos.usage.output_tokens == 0

    count = claude.messages.count_tokens(
        model="demo", system=SYSTEM, messages=[{"role": "user", "content": USER}]
    )
    assert count.input_tokens == prompt


def sse_events(node: NodeProcess, path: str, body: dict[str, object]) -> list[str]:
    """The names of a stream's SSE events, checking each names its payload's type."""
    names = []
    with httpx.stream("POST", f"{node.base_url}{path}", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert json.loads(line.removeprefix("data: "))["type"] == event
                names.append(event)
    return names


def test_anthropic_and_responses_streams_on_the_wire(
    node: NodeProcess, ban: dict[str, int]
) -> None:
    body = {"model": "demo", "max_tokens": 4, "logit_bias": ban, "stream": True}
    names = sse_events(node, "/v1/messages", {**body, "messages": MESSAGES[1:]})
    assert names[:2] == ["message_start", "ping"]
    # More pings may come as keep-alives (this node sends one after 50 ms of quiet).
    # A content block opens with the first text (a response may start with
    # thinking or a tool call instead).
    rest = [name for name in names[2:] if name != "ping"]
    assert rest == [
        "content_block_start",
        *["content_block_delta"] * (len(rest) - 4),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    body = {"model": "demo", "max_output_tokens": 4, "logit_bias": ban, "stream": True}
    names = sse_events(node, "/v1/responses", {**body, "input": USER})
    assert names[-1] == "response.incomplete"
    assert names.count("response.output_text.delta") == len(names) - 8


def test_ollama_chat_and_generate(
    olla: ollama.Client, ban: dict[str, int], force_eos: dict[str, int]
) -> None:
    options = {"num_predict": 12, "temperature": 0, "logit_bias": ban}
    whole = olla.chat(model="demo:latest", messages=MESSAGES, options=options)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 12
    assert whole.model == "demo:latest" and whole.message.role == "assistant"
    assert whole.total_duration and whole.eval_duration and whole.prompt_eval_duration
    parts = list(olla.chat(model="demo", messages=MESSAGES, options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 12

    text = whole.message.content or ""
    stop = text[4:8]
    assert stop.strip(), text
    stopped = olla.chat(model="demo", messages=MESSAGES, options={**options, "stop": [stop]})
    assert stopped.done_reason == "stop" and stopped.message.content == text[: text.index(stop)]

    gen_parts = list(olla.generate(model="demo", prompt=USER, options=options, stream=True))
    gen = olla.generate(model="demo", prompt=USER, options=options)
    assert "".join(p.response for p in gen_parts) == gen.response
    assert gen.done_reason == "length" and gen_parts[-1].eval_count == 12

    eos = olla.generate(model="demo", prompt=USER, options={"logit_bias": force_eos})
    assert eos.done_reason == "stop" and eos.response == "" and eos.eval_count == 0
    # No prompt: Ollama's "load the model" request.
    loaded = olla.generate(model="demo")
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_catalogue_under_both_prefixes(node: NodeProcess) -> None:
    for host in (node.base_url, f"{node.base_url}/ollama"):
        client = ollama.Client(host=host, timeout=10)
        listed = client.list().models
        assert [m.model for m in listed] == ["demo:latest"]
        assert listed[0].size and listed[0].details and listed[0].details.family == "llama"
        shown = client.show("demo")
        assert shown.modelinfo and shown.modelinfo["llama.context_length"] == 2048
        assert [m.model for m in client.ps().models] == ["demo:latest"]
        assert httpx.get(f"{host}/api/version", timeout=10).json()["version"]


def test_bench_reports_generation_stats(node: NodeProcess, ban: dict[str, int]) -> None:
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 20, "logit_bias": ban}
    result = httpx.post(f"{node.base_url}/bench/chat/completions", json=body, timeout=30).json()
    stats = result["generation_stats"]
    assert result["usage"]["completion_tokens"] == stats["completion_tokens"] == 20
    assert 0 < stats["time_to_first_token_s"] < stats["total_s"]
    assert stats["prompt_tps"] > 0 and stats["decode_tps"] > 0
    streaming = httpx.post(
        f"{node.base_url}/bench/chat/completions", json={**body, "stream": True}, timeout=30
    )
    assert streaming.status_code == 400 and streaming.json()["error"]["param"] == "stream"


# ---- cancel ----


def cancel(node: NodeProcess, request_id: str) -> httpx.Response:
    return httpx.post(f"{node.base_url}/v1/cancel/{request_id}", timeout=10)


LONG = 1500  # far more than a test waits for: only a cancel ends these early


def test_cancel_ends_each_dialects_stream(
    node: NodeProcess, oai: openai.OpenAI, claude: anthropic.Anthropic, ban: dict[str, int]
) -> None:
    chat = oai.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=LONG, logit_bias=ban, stream=True
    )
    with pytest.raises(openai.APIError, match="cancelled"):
        for chunk in chat:
            assert cancel(node, chunk.id).status_code in (200, 404)

    messages = claude.messages.create(
        model="demo",
        messages=[{"role": "user", "content": USER}],
        max_tokens=LONG,
        stream=True,
        extra_body={"logit_bias": ban},
    )
    with pytest.raises(anthropic.APIStatusError, match="cancelled"):
        for event in messages:
            if event.type == "message_start":
                assert cancel(node, event.message.id).status_code == 200

    responses = oai.responses.create(
        model="demo",
        input=USER,
        max_output_tokens=LONG,
        stream=True,
        extra_body={"logit_bias": ban},
    )
    kinds = []
    for event in responses:
        kinds.append(event.type)
        if event.type == "response.created":
            assert cancel(node, event.response.id).status_code == 200
    assert kinds[-1] == "response.failed"
    assert event.response.error is not None and event.response.error.code == "cancelled"  # type: ignore[union-attr]

    # Ollama's bodies carry no id: the X-Request-Id header names the request.
    body = {"model": "demo", "prompt": USER, "options": {"num_predict": LONG, "logit_bias": ban}}
    with httpx.stream("POST", f"{node.base_url}/api/generate", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert not json.loads(next(lines))["done"]
        assert cancel(node, r.headers["x-request-id"]).status_code == 200
        last = [json.loads(line) for line in lines if line][-1]
    assert "cancelled" in last["error"]

    assert cancel(node, "chatcmpl-nothing").status_code == 404
    assert node.health()[1]["open_streams"] == 0


def test_a_request_is_cancelled_by_the_id_its_client_gave_it(
    node: NodeProcess, oai: openai.OpenAI, claude: anthropic.Anthropic, ban: dict[str, int]
) -> None:
    """With X-Request-Id the client names its request, so it can cancel it before
    any response, non-streaming too. Responses name the node's own id in that
    header, as OpenAI's do."""
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            oai.chat.completions.create(
                model="demo",
                messages=MESSAGES,
                max_tokens=LONG,
                logit_bias=ban,
                extra_headers={"X-Request-Id": "my-request.1"},
            )
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 30
    while (answer := cancel(node, "my-request.1")).status_code == 404:
        assert time.monotonic() < deadline, "the request never showed up"
        time.sleep(0.02)
    worker.join(30)
    assert answer.status_code == 200, answer.text
    (error,) = outcome
    assert isinstance(error, openai.APIStatusError) and error.status_code == 499

    raw = claude.messages.with_raw_response.create(
        model="demo",
        max_tokens=3,
        messages=[{"role": "user", "content": USER}],
        extra_headers={"X-Request-Id": "mine:2"},
    )
    assert raw.headers["x-request-id"] == raw.parse().id != "mine:2"
    with pytest.raises(openai.BadRequestError, match="X-Request-Id"):
        oai.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=3, extra_headers={"X-Request-Id": "a b"}
        )
    assert node.health()[1]["open_streams"] == 0


# ---- validation: a 4xx in the dialect's own envelope, never a 5xx ----


def openai_shape(body: dict[str, object]) -> bool:
    error = body.get("error")
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


def anthropic_shape(body: dict[str, object]) -> bool:
    error = body.get("error")
    return body.get("type") == "error" and isinstance(error, dict) and "type" in error


def ollama_shape(body: dict[str, object]) -> bool:
    return isinstance(body.get("error"), str)


ENDPOINTS = {
    "/v1/chat/completions": (openai_shape, {"messages": [{"role": "user", "content": "hi"}]}),
    "/v1/completions": (openai_shape, {"prompt": "hi"}),
    "/v1/responses": (openai_shape, {"input": "hi"}),
    "/bench/chat/completions": (openai_shape, {"messages": [{"role": "user", "content": "hi"}]}),
    "/v1/messages": (
        anthropic_shape,
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ),
    "/v1/messages/count_tokens": (
        anthropic_shape,
        {"messages": [{"role": "user", "content": "hi"}]},
    ),
    "/api/chat": (ollama_shape, {"messages": [{"role": "user", "content": "hi"}]}),
    "/api/generate": (ollama_shape, {"prompt": "hi"}),
    "/ollama/api/chat": (ollama_shape, {"messages": [{"role": "user", "content": "hi"}]}),
    "/api/show": (ollama_shape, {"model": "demo"}),
}

JUNK = [b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe", b'{"model": 5}', b'{"model": "demo"}']


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_malformed_requests_get_a_4xx_in_the_dialects_envelope(
    node: NodeProcess, path: str, encoder: HFPromptEncoder
) -> None:
    shape, valid = ENDPOINTS[path]
    url = f"{node.base_url}{path}"

    def check(response: httpx.Response, status: int | None = None) -> None:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        if status is not None:
            assert response.status_code == status, response.text
        assert shape(response.json()), response.text

    for junk in JUNK:
        if junk == b'{"model": "demo"}' and shape is ollama_shape:
            continue  # valid for Ollama: a "load the model" request, or a show

        check(httpx.post(url, content=junk, timeout=10), None)
    check(httpx.post(url, json={**valid, "model": "no-such-model"}, timeout=10), 404)
    check(httpx.post(url, content=b"x" * (5 * 1024 * 1024), timeout=30), 413)
    # The prompt field (the first key of `valid`) with the wrong type.
    prompt_field = next(iter(valid))
    check(httpx.post(url, json={**valid, "model": "demo", prompt_field: 5}, timeout=10), 400)
    if path not in ("/api/show", "/v1/messages/count_tokens"):
        sampling = {"stream": "yes"} if path.startswith(("/api", "/ollama")) else {"top_p": "x"}
        check(httpx.post(url, json={**valid, "model": "demo", **sampling}, timeout=10), 400)
    if path in ("/api/show", "/v1/messages/count_tokens"):
        return
    words = " ".join(f"w{i}" for i in range(3000))
    assert len(encoder.text_tokens(words)) > 2048
    long_prompt = json.loads(json.dumps(valid).replace('"hi"', json.dumps(words)))
    check(httpx.post(url, json={**long_prompt, "model": "demo"}, timeout=30), 400)


def test_official_clients_see_their_own_error_types(
    oai: openai.OpenAI, claude: anthropic.Anthropic, olla: ollama.Client
) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.responses.create(model="demo", input="hi", max_output_tokens=100_000)
    assert too_long.value.code == "context_length_exceeded"
    # Out-of-vocabulary ids are refused before dispatch, not by the runner mid-stream.
    with pytest.raises(openai.BadRequestError) as bad_ids:
        oai.completions.create(model="demo", prompt=[1, 999_999], stream=True)
    assert bad_ids.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as bad_bias:
        oai.chat.completions.create(
            model="demo", messages=MESSAGES, logit_bias={"999999": -100}, stream=True
        )  # type: ignore[arg-type]
    assert bad_bias.value.param == "logit_bias"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model="demo",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_body={"temperature": 1.5},
        )
    with pytest.raises(anthropic.BadRequestError, match="image"):
        claude.messages.create(
            model="demo",
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}
                    ],
                }
            ],
        )
    with pytest.raises(ollama.ResponseError) as unknown:
        olla.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as bad:
        olla.generate(model="demo", prompt="hi", options={"temperature": -1})
    assert bad.value.status_code == 400 and "temperature" in bad.value.error


def test_unknown_routes_use_the_dialect_of_their_path(node: NodeProcess) -> None:
    anthropic_404 = httpx.get(f"{node.base_url}/v1/messages/nothing", timeout=10)
    assert anthropic_404.status_code == 405 or anthropic_404.status_code == 404
    assert anthropic_shape(anthropic_404.json())
    ollama_404 = httpx.get(f"{node.base_url}/api/nothing", timeout=10)
    assert ollama_404.status_code == 404 and ollama_shape(ollama_404.json())
    wrong_method = httpx.get(f"{node.base_url}/api/chat", timeout=10)
    assert wrong_method.status_code == 405 and ollama_shape(wrong_method.json())


def test_no_cors_headers_unless_configured(node: NodeProcess) -> None:
    origin = {"Origin": "http://site.example"}
    assert (
        "access-control-allow-origin"
        not in httpx.get(f"{node.base_url}/v1/models", headers=origin, timeout=10).headers
    )


# ---- metrics ----


def test_metrics_in_prometheus_format(
    node: NodeProcess, oai: openai.OpenAI, encoder: HFPromptEncoder
) -> None:
    # Twice: the second reuses the first's prompt from the prefix cache.
    for _ in range(2):
        oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3)
    # A 404 of its own (an unknown model), so the test stands alone.
    unknown = {"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{node.base_url}/v1/messages", json=unknown, timeout=10).status_code == 404
    text = httpx.get(f"{node.base_url}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("exo_trio_http_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert value("exo_trio_http_requests_total", endpoint="/v1/messages", status="404") >= 1
    assert value("exo_trio_requests_in_flight") == 0
    assert value("exo_trio_generated_tokens_total", model="demo") >= 3
    assert value("exo_trio_time_to_first_token_seconds_count", model="demo") >= 1
    assert value("exo_trio_inter_token_seconds_count", model="demo") >= 2
    assert value("exo_trio_queue_depth") == 0
    assert value("exo_trio_runner_restarts_total") == 0
    assert value("exo_trio_orphan_events_total", kind="unknown") == 0
    assert value("exo_trio_orphan_events_total", kind="after_terminal") == 0
    assert value("exo_trio_runner_ready") == 1
    prompt_tokens = len(encoder.chat_tokens(MESSAGES))
    assert value("exo_trio_prompt_cache_hits_total") >= 1
    assert value("exo_trio_prompt_cache_lookups_total") >= value("exo_trio_prompt_cache_hits_total")
    assert value("exo_trio_prompt_cache_tokens_reused_total") >= prompt_tokens - 1
    assert value("exo_trio_prompt_cache_entries") >= 1
    assert 0 < value("exo_trio_prompt_cache_bytes") <= value("exo_trio_prompt_cache_capacity_bytes")
