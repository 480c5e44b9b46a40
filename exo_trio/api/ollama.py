"""Ollama chat and generate: POST /api/chat, POST /api/generate (also under
/ollama/). NDJSON streaming by default, one JSON object with `"stream": false`.

Decisions (see docs/api.md): `model` may carry Ollama's `:latest` tag; options
default to Ollama's own defaults (temperature 0.8, top_p 0.9, top_k 40);
num_predict is capped at what fits in the context, as Ollama does, but a prompt
that alone does not fit is refused (Ollama would silently truncate it). A request
with no prompt / no messages only "loads" the model (`done_reason: "load"`), which
is how Ollama clients preload.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec
from quart import Response

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.generation import (
    Timing,
    client_request_id,
    failure_error,
    find_model,
    json_response,
    plan_generation,
)
from exo_trio.api.sampling import build_params, stop_list
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.node import ModelCard, Node
from exo_trio.types import GenerationFailed, GenerationFinished, SamplingParams

NDJSON = "application/x-ndjson"
# Ollama's documented defaults for options a request leaves out.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 40

_json = msgspec.json.Encoder()


class OllamaOptions(msgspec.Struct, kw_only=True):
    # Unknown options (num_ctx, num_gpu, mirostat, ...) are accepted and ignored,
    # as clients send them habitually.
    num_predict: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    top_p: float | None = None
    top_k: int | None = None
    # Extensions, not Ollama's (as in OpenAI chat completions): ban tokens; run
    # past EOS. Tests and benchmarks use them to fix the length.
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False


class OllamaMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, object]] | None = None
    thinking: str | None = None


class OllamaRequest(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = True
    options: OllamaOptions | None = None
    format: str | dict[str, object] | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None


class ChatRequest(OllamaRequest, kw_only=True):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, object]] | None = None


class GenerateRequest(OllamaRequest, kw_only=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


def ollama_model(node: Node, name: str) -> ModelCard:
    """A model by Ollama name: `demo` and `demo:latest` are the same model."""
    return find_model(node, name.removesuffix(":latest"))


def refuse_unsupported(fields: dict[str, object]) -> None:
    for name, value in fields.items():
        if value:
            raise ApiError(400, f"`{name}` is not supported by this server.", param=name)


def ollama_params(
    options: OllamaOptions | None, model: ModelCard, prompt: list[int]
) -> SamplingParams:
    o = options or OllamaOptions()
    room = model.context_length - len(prompt)
    if o.num_predict is None or o.num_predict in (-1, -2):
        max_tokens = max(1, room)  # -1: until done; -2: fill the context
    else:
        max_tokens = min(o.num_predict, room) if room > 0 else o.num_predict
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
        names={
            "max_tokens": "options.num_predict",
            "temperature": "options.temperature",
            "top_p": "options.top_p",
            "top_k": "options.top_k",
            "stop": "options.stop",
            "logit_bias": "options.logit_bias",
        },
    )


def chat_prompt(node: Node, body: ChatRequest) -> list[int] | None:
    refuse_unsupported({"tools": body.tools, "format": body.format})
    messages = []
    for i, m in enumerate(body.messages):
        refuse_unsupported({f"messages[{i}].images": m.images})
        refuse_unsupported({f"messages[{i}].tool_calls": m.tool_calls})
        messages.append({"role": m.role, "content": m.content})
    return node.encoder.chat_tokens(messages) if messages else None


def generate_prompt(node: Node, body: GenerateRequest) -> list[int] | None:
    refuse_unsupported(
        {
            "suffix": body.suffix,
            "template": body.template,
            "context": body.context,
            "images": body.images,
            "format": body.format,
        }
    )
    if not body.prompt:
        return None
    if body.raw:
        return node.encoder.text_tokens(body.prompt)
    # Not raw: Ollama applies the model's template to (system, prompt).
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    return node.encoder.chat_tokens(messages)


def nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


class OllamaLines(StreamEncoder):
    """NDJSON lines for chat (`message`) or generate (`response`)."""

    def __init__(self, node: Node, model_name: str, kind: Literal["chat", "generate"]) -> None:
        self.node = node
        self.model_name = model_name
        self.kind = kind

    def piece(self, text: str) -> dict[str, object]:
        if self.kind == "chat":
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def object(self, text: str, done: bool, **more: object) -> dict[str, object]:
        created = datetime.fromtimestamp(self.node.seams.wall_clock(), UTC)
        return {
            "model": self.model_name,
            "created_at": created.isoformat().replace("+00:00", "Z"),
            **self.piece(text),
            "done": done,
            **more,
        }

    def final(
        self, text: str, reason: str, prompt_tokens: int, completion_tokens: int, timing: Timing
    ) -> dict[str, object]:
        return self.object(
            text,
            True,
            done_reason=reason,
            total_duration=nanoseconds(timing.total_seconds),
            load_duration=0,
            prompt_eval_count=prompt_tokens,
            prompt_eval_duration=nanoseconds(timing.prefill_seconds),
            eval_count=completion_tokens,
            eval_duration=nanoseconds(timing.decode_seconds),
        )

    def text(self, text: str) -> list[bytes]:
        return [_json.encode(self.object(text, False)) + b"\n"]

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        final = self.final(
            "", event.finish_reason, event.prompt_tokens, event.completion_tokens, timing
        )
        return [_json.encode(final) + b"\n"]

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        # The ollama client raises ResponseError on a line with an `error` key.
        return [_json.encode({"error": failure_error(event).message}) + b"\n"]


async def generate_or_chat(
    ctx: ApiContext,
    body: OllamaRequest,
    model: ModelCard,
    prompt: list[int] | None,
    kind: Literal["chat", "generate"],
) -> Response | dict[str, object]:
    node = ctx.node
    lines = OllamaLines(node, body.model, kind)
    if prompt is None:
        return lines.object("", True, done_reason="load")
    params = ollama_params(body.options, model, prompt)
    command = plan_generation(
        node, model, prompt, params, node.seams.new_id(kind), client_id=client_request_id()
    )
    ctx.begin(command)
    if body.stream:
        # Ollama's NDJSON has no keep-alive line: clients would take any line as data.
        return ctx.stream(command, lines, NDJSON, keepalive=False)
    result = await ctx.complete(command)
    final = lines.final(
        result.text,
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
        result.timing,
    )
    return json_response(final, command)


async def chat(ctx: ApiContext) -> Response | dict[str, object]:
    body = decode_body(await ctx.body(), ChatRequest)
    model = ollama_model(ctx.node, body.model)
    return await generate_or_chat(ctx, body, model, chat_prompt(ctx.node, body), "chat")


async def generate(ctx: ApiContext) -> Response | dict[str, object]:
    body = decode_body(await ctx.body(), GenerateRequest)
    model = ollama_model(ctx.node, body.model)
    return await generate_or_chat(ctx, body, model, generate_prompt(ctx.node, body), "generate")
