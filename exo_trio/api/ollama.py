"""Ollama chat and generate: POST /api/chat, POST /api/generate (also under
/ollama/). NDJSON streaming by default, one JSON object with `"stream": false`.

Decisions (see docs/api.md): `model` may carry Ollama's `:latest` tag; options
default to Ollama's own defaults (temperature 0.8, top_p 0.9, top_k 40);
num_predict is capped at what fits in the context, as Ollama does, but a prompt
that alone does not fit is refused (Ollama would silently truncate it). A request
with no prompt / no messages only "loads" the model (`done_reason: "load"`), which
is how Ollama clients preload. Tools go through the chat template and calls come
back in `message.tool_calls`; thinking in `message.thinking` (`think: false`
turns it off); `format` ("json" or a schema) is a grammar. Ollama has no
tool_choice: `options.tool_choice` is an extension that forces a call.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from quart import Response

from exo_trio.api import loading
from exo_trio.api.chat_plan import ChatPlan, ChatSetup, check_tools, parse_arguments, plan_chat
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.fields import OLLAMA_CHAT, OLLAMA_GENERATE, OLLAMA_OPTIONS, refuse_present
from exo_trio.api.generation import (
    Completion,
    Timing,
    client_request_id,
    failure_error,
    find_model,
    json_response,
    plan_generation,
)
from exo_trio.api.openai_common import token_text
from exo_trio.api.sampling import build_params, stop_list
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.api.structured import ToolChoice, json_grammar
from exo_trio.chat_output import OutputSplitter, Part, ToolCall
from exo_trio.node import ModelCard, Node
from exo_trio.types import (
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
    TokenLogprob,
)

NDJSON = "application/x-ndjson"
# Ollama's documented defaults for options a request leaves out.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 40

_json = msgspec.json.Encoder()


class OllamaOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every option Ollama defines (api/fields.py says what each does here)."""

    num_predict: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    use_mmap: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    use_mlock: bool | None = None
    f16_kv: bool | None = None
    vocab_only: bool | None = None
    embedding_only: bool | None = None
    logits_all: bool | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    # Extensions, not Ollama's (as in OpenAI chat completions): ban tokens; run
    # past EOS (tests and benchmarks fix the length so); force a tool call.
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None


class OllamaFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] | str = {}


class OllamaToolCall(msgspec.Struct, kw_only=True):
    function: OllamaFunction


class OllamaMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class OllamaRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    stream: bool | None = True
    options: OllamaOptions | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatRequest(OllamaRequest, kw_only=True, forbid_unknown_fields=True):
    messages: list[OllamaMessage] | None = None
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(OllamaRequest, kw_only=True, forbid_unknown_fields=True):
    prompt: str | None = ""
    system: str | None = None
    raw: bool | None = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None


def ollama_model(node: Node, name: str) -> ModelCard:
    """A model by Ollama name: `demo` and `demo:latest` are the same model."""
    return find_model(node, name.removesuffix(":latest"))


def ollama_params(body: OllamaRequest, model: ModelCard, prompt: list[int]) -> SamplingParams:
    o = body.options or OllamaOptions()
    refuse_present(o, OLLAMA_OPTIONS, "options.")
    room = model.context_length - len(prompt)
    if o.num_predict is None or o.num_predict in (-1, -2):
        max_tokens = max(1, room)  # -1: until done; -2: fill the context
    else:
        max_tokens = min(o.num_predict, room) if room > 0 else o.num_predict
    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    names = {
        f: f"options.{f}"
        for f in (
            "temperature",
            "top_p",
            "top_k",
            "stop",
            "logit_bias",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repeat_penalty",
            "repeat_last_n",
        )
    }
    return build_params(
        max_tokens=max_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=DEFAULT_TOP_K if o.top_k is None else o.top_k,
        defaults=(DEFAULT_TEMPERATURE, DEFAULT_TOP_P),
        seed=o.seed,
        stop=stop_list(o.stop),
        logit_bias=o.logit_bias,
        ignore_eos=o.ignore_eos,
        max_stops=None,
        min_p=o.min_p,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        repeat_penalty=o.repeat_penalty,
        repeat_last_n=o.repeat_last_n,
        logprobs=logprobs,
        names={**names, "max_tokens": "options.num_predict", "logprobs": "top_logprobs"},
    )


def _thinking(body: OllamaRequest) -> bool | None:
    """think: false turns thinking off; true or a level ("high", ...) on."""
    if body.think is None:
        return None
    return body.think not in (False, "false", "none")


def _format(plan: ChatPlan, value: str | dict[str, Any] | None) -> None:
    plan.schema_param = "format"
    if value in (None, ""):
        return
    if value == "json":
        plan.json_mode = True
    elif isinstance(value, dict):
        plan.schema = value
    else:
        raise ApiError(400, 'format must be "json" or a JSON schema.', param="format")


def _tool_choice(options: OllamaOptions | None) -> ToolChoice:
    parallel = not (options and options.parallel_tool_calls is False)
    choice = options.tool_choice if options else None
    if choice is None or choice in ("auto", "none", "required"):
        return ToolChoice(choice or "auto", parallel=parallel)
    return ToolChoice("named", choice, parallel)


def chat_plan(body: ChatRequest) -> ChatPlan:
    refuse_present(body, OLLAMA_CHAT)
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages or []):
        where = f"messages[{i}]"
        refuse_present(m, {"images": ("refused", "text only")}, f"{where}.")
        message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": parse_arguments(
                            c.function.arguments, f"{where}.tool_calls[{j}].function.arguments"
                        ),
                    },
                }
                for j, c in enumerate(m.tool_calls)
            ]
        if m.tool_name is not None:
            message["name"] = m.tool_name
        if m.thinking:
            message["reasoning_content"] = m.thinking
        messages.append(message)
    tools = check_tools(list(body.tools)) if body.tools else None
    plan = ChatPlan(
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(body.options),
        thinking=_thinking(body),
        tools_param="tools",
    )
    _format(plan, body.format)
    return plan


def tool_call_json(call: ToolCall) -> dict[str, object]:
    return {"function": {"name": call.name, "arguments": call.arguments}}


def logprob_json(chunk: ChunkGenerated) -> dict[str, object]:
    def entry(t: TokenLogprob) -> dict[str, object]:
        return {"token": token_text(t.raw), "logprob": t.logprob, "bytes": list(t.raw)}

    assert chunk.logprob is not None
    return {**entry(chunk.logprob), "top_logprobs": [entry(t) for t in chunk.top_logprobs]}


def nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


class OllamaLines(StreamEncoder):
    """NDJSON lines for chat (`message`) or generate (`response`)."""

    def __init__(
        self,
        node: Node,
        model_name: str,
        kind: Literal["chat", "generate"],
        setup: ChatSetup | None = None,
    ) -> None:
        self.node = node
        self.model_name = model_name
        self.kind = kind
        self.splitter: OutputSplitter | None = setup.splitter() if setup else None
        self.pending: list[dict[str, object]] = []  # logprobs not yet sent

    def piece(
        self, text: str, thinking: str = "", calls: list[ToolCall] | None = None
    ) -> dict[str, object]:
        if self.kind == "chat":
            message: dict[str, object] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [tool_call_json(c) for c in calls]
            return {"message": message}
        out: dict[str, object] = {"response": text}
        if thinking:
            out["thinking"] = thinking
        return out

    def object(
        self,
        text: str,
        done: bool,
        thinking: str = "",
        calls: list[ToolCall] | None = None,
        **more: object,
    ) -> dict[str, object]:
        created = datetime.fromtimestamp(self.node.seams.wall_clock(), UTC)
        return {
            "model": self.model_name,
            "created_at": created.isoformat().replace("+00:00", "Z"),
            **self.piece(text, thinking, calls),
            "done": done,
            **more,
        }

    def final(
        self,
        result: Completion | GenerationFinished,
        timing: Timing,
        text: str = "",
        thinking: str = "",
        calls: list[ToolCall] | None = None,
        logprobs: list[dict[str, object]] | None = None,
    ) -> dict[str, object]:
        more: dict[str, object] = {}
        if logprobs:
            more["logprobs"] = logprobs
        return self.object(
            text,
            True,
            thinking,
            calls,
            done_reason=result.finish_reason,
            total_duration=nanoseconds(timing.total_seconds),
            load_duration=0,
            prompt_eval_count=result.prompt_tokens,
            prompt_eval_duration=nanoseconds(timing.prefill_seconds),
            eval_count=result.completion_tokens,
            eval_duration=nanoseconds(timing.decode_seconds),
            **more,
        )

    def line(self, payload: dict[str, object]) -> bytes:
        return _json.encode(payload) + b"\n"

    def parts(self, parts: list[Part]) -> list[bytes]:
        out = []
        for part in parts:
            more: dict[str, object] = {}
            if self.pending and part.channel == "text":
                more["logprobs"], self.pending = self.pending, []
            if part.call is not None:
                payload = self.object("", False, calls=[part.call])
            elif part.channel == "thinking":
                payload = self.object("", False, thinking=part.text)
            else:
                payload = self.object(part.text, False, **more)
            out.append(self.line(payload))
        return out

    def token(self, event: ChunkGenerated) -> list[bytes]:
        if event.logprob is not None:
            self.pending.append(logprob_json(event))
        return self.text(event.text) if event.text else []

    def text(self, text: str) -> list[bytes]:
        if self.splitter is None:
            more: dict[str, object] = {}
            if self.pending:
                more["logprobs"], self.pending = self.pending, []
            return [self.line(self.object(text, False, **more))]
        return self.parts(self.splitter.push(text))

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        out = self.parts(self.splitter.finish()) if self.splitter else []
        logprobs, self.pending = self.pending, []
        return [*out, self.line(self.final(event, timing, logprobs=logprobs))]

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        # Everything generated first (a call that never closed comes back as
        # text). The ollama client raises ResponseError on a line with `error`.
        out = self.parts(self.splitter.finish()) if self.splitter else []
        return [*out, self.line({"error": failure_error(event).message})]


async def respond(
    ctx: ApiContext,
    body: OllamaRequest,
    command: TextGeneration,
    kind: Literal["chat", "generate"],
    setup: ChatSetup | None,
) -> Response | dict[str, object]:
    lines = OllamaLines(ctx.node, body.model, kind, setup)
    ctx.begin(command)
    if body.stream is not False:
        # Ollama's NDJSON has no keep-alive line: clients would take any line as data.
        return ctx.stream(command, lines, NDJSON, keepalive=False)
    result = await ctx.complete(command)
    logprobs = [logprob_json(c) for c in result.chunks if c.logprob is not None]
    if setup is None:
        final = lines.final(result, result.timing, result.text, logprobs=logprobs)
    else:
        text, thinking, calls = setup.split(result.text)
        final = lines.final(result, result.timing, text, thinking, calls, logprobs)
    return json_response(final, command)


def loaded(ctx: ApiContext, body: OllamaRequest, kind: Literal["chat", "generate"]) -> dict:
    """The answer to a request without a prompt: the model is loaded."""
    return OllamaLines(ctx.node, body.model, kind).object("", True, done_reason="load")


async def load_model(ctx: ApiContext, name: str) -> ModelCard:
    """As Ollama does, a model the node has (in its store, or on another node) but
    does not run yet is loaded on first use (api/loading.py)."""
    if ctx.node.catalog is not None and ctx.node.find_model(name.removesuffix(":latest")) is None:
        return await loading.load(ctx, name)
    return ollama_model(ctx.node, name)


def unloads(keep_alive: str | float | None) -> bool:
    """`keep_alive: 0` (or "0", "0s", "0m") with nothing to generate unloads the
    model, as in Ollama."""
    return keep_alive is not None and str(keep_alive).strip() in ("0", "0.0", "0s", "0m")


async def unload(ctx: ApiContext, body: OllamaRequest, kind: Literal["chat", "generate"]) -> dict:
    if ctx.node.catalog is not None:
        await loading.unload(ctx, body.model)
    return OllamaLines(ctx.node, body.model, kind).object("", True, done_reason="unload")


async def chat(ctx: ApiContext) -> Response | dict[str, object]:
    body = decode_body(await ctx.body(), ChatRequest)
    if not body.messages and unloads(body.keep_alive):
        return await unload(ctx, body, "chat")
    model = await load_model(ctx, body.model)
    plan = chat_plan(body)
    if not plan.messages:
        return loaded(ctx, body, "chat")
    command, setup = plan_chat(
        ctx.node,
        model,
        plan,
        lambda prompt: ollama_params(body, model, prompt),
        ctx.node.seams.new_id("chat"),
        client_request_id(),
    )
    return await respond(ctx, body, command, "chat", setup)


async def generate(ctx: ApiContext) -> Response | dict[str, object]:
    body = decode_body(await ctx.body(), GenerateRequest)
    if not body.prompt and unloads(body.keep_alive):
        return await unload(ctx, body, "generate")
    model = await load_model(ctx, body.model)
    refuse_present(body, OLLAMA_GENERATE)
    node = ctx.node
    if not body.prompt:
        return loaded(ctx, body, "generate")
    request_id = node.seams.new_id("generate")
    if body.raw:
        # A raw prompt is text, not a conversation: no template, no thinking split;
        # `format` still constrains it.
        plan = ChatPlan(messages=[])
        _format(plan, body.format)
        prompt = node.encoder_for(model.id).text_tokens(body.prompt)
        params = ollama_params(body, model, prompt)
        if plan.schema is not None or plan.json_mode:
            grammar = json_grammar(plan.schema, "format")
            params = msgspec.structs.replace(params, grammar=grammar)
        command = plan_generation(
            node, model, prompt, params, request_id, "prompt", client_request_id()
        )
        return await respond(ctx, body, command, "generate", None)
    # Not raw: Ollama applies the model's template to (system, prompt).
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    plan = ChatPlan(messages=messages, thinking=_thinking(body))
    _format(plan, body.format)
    command, setup = plan_chat(
        node,
        model,
        plan,
        lambda prompt: ollama_params(body, model, prompt),
        request_id,
        client_request_id(),
        prompt_param="prompt",
    )
    return await respond(ctx, body, command, "generate", setup)
