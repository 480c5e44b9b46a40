"""OpenAI legacy text completions: POST /v1/completions, streaming and not.

The prompt is raw text (no chat template), tokenized without special tokens, or
a list of token ids. One prompt per request (a list of several is a batch, which
this endpoint does not take).
"""

from __future__ import annotations

from quart import Response

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError, decode_body
from exo_trio.api.fields import OPENAI_COMPLETIONS, refuse_present
from exo_trio.api.generation import (
    client_request_id,
    find_model,
    json_response,
    plan_generation,
)
from exo_trio.api.openai_common import (
    OpenAIChunks,
    OpenAISampling,
    openai_params,
    token_text,
    usage,
)
from exo_trio.node import Node
from exo_trio.types import ChunkGenerated, TextGeneration

# OpenAI's default for this endpoint (chat completions default to "until done").
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(OpenAISampling, kw_only=True, forbid_unknown_fields=True):
    model: str
    # msgspec allows one array type in a union: a list of token ids or of one
    # string both arrive here and are told apart below.
    prompt: str | list[str | int]
    max_tokens: int | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


def prompt_tokens(node: Node, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return node.encoder_for(body.model).text_tokens(prompt)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        if body.echo:
            raise ApiError(400, "echo needs a text prompt, not token ids.", param="echo")
        return [int(p) for p in prompt]
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return node.encoder_for(body.model).text_tokens(prompt[0])
    raise ApiError(
        400, "prompt must be one string or one list of token ids (no batches).", param="prompt"
    )


def parse_completion_request(node: Node, raw: bytes) -> tuple[CompletionRequest, TextGeneration]:
    body = decode_body(raw, CompletionRequest)
    refuse_present(body, OPENAI_COMPLETIONS)
    if body.best_of not in (None, 1):
        raise ApiError(400, "Only best_of=1 is supported.", param="best_of")
    model = find_model(node, body.model)
    tokens = prompt_tokens(node, body)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = openai_params(body, max_tokens, body.logprobs)
    request_id = node.seams.new_id("cmpl")
    return body, plan_generation(
        node, model, tokens, params, request_id, "prompt", client_request_id()
    )


def echoed(body: CompletionRequest) -> str:
    """The prompt text to put before the completion when echo is on."""
    if not body.echo:
        return ""
    return body.prompt if isinstance(body.prompt, str) else str(body.prompt[0])


def completion_logprobs(chunks: list[ChunkGenerated], offset: int) -> dict[str, object]:
    """The legacy logprobs object for these tokens; `offset` is where the first
    one's text starts in the choice's text."""
    tokens, values, top, offsets = [], [], [], []
    for chunk in chunks:
        if chunk.logprob is None:
            continue
        tokens.append(token_text(chunk.logprob.raw))
        values.append(chunk.logprob.logprob)
        top.append({token_text(t.raw): t.logprob for t in chunk.top_logprobs})
        offsets.append(offset)
        offset += len(chunk.text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}


class CompletionChunks(OpenAIChunks):
    object = "text_completion"

    def __init__(
        self, command: TextGeneration, created: int, include_usage: bool, echo: str
    ) -> None:
        super().__init__(command, created, include_usage)
        self.echo = echo
        self.offset = 0  # characters of text sent so far

    def start(self) -> list[bytes]:
        return self.text(self.echo) if self.echo else []

    def choice(
        self, text: str | None, finish_reason: str | None, logprobs: object = None
    ) -> dict[str, object]:
        return {
            "text": text or "",
            "index": 0,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }

    def token(self, event: ChunkGenerated) -> list[bytes]:
        if event.logprob is None:
            return self.text(event.text) if event.text else []
        # Every token gets its chunk (with its logprobs), even one whose text is
        # held back, so each token's logprob is reported once.
        logprobs = completion_logprobs([event], self.offset)
        self.offset += len(event.text)
        return [self.chunk([self.choice(event.text, None, logprobs)])]

    def text(self, text: str) -> list[bytes]:
        self.offset += len(text)
        return super().text(text)


async def completions(ctx: ApiContext) -> Response:
    body, command = parse_completion_request(ctx.node, await ctx.body())
    ctx.begin(command)
    created = int(ctx.node.seams.wall_clock())
    if body.stream:
        encoder = CompletionChunks(command, created, body.include_usage, echoed(body))
        return ctx.stream(command, encoder)
    result = await ctx.complete(command)
    payload = {
        "id": command.request_id,
        "object": "text_completion",
        "created": created,
        "model": command.model,
        "system_fingerprint": None,
        "choices": [
            {
                "text": echoed(body) + result.text,
                "index": 0,
                "logprobs": None
                if body.logprobs is None
                else completion_logprobs(result.chunks, len(echoed(body))),
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
    }
    return json_response(payload, command)
