"""What OpenAI's chat completions and legacy completions share: the sampling
fields, usage, and the chunk stream (`data: {...}` events ending in `[DONE]`)."""

from __future__ import annotations

import msgspec

from exo_trio.api.errors import ApiError, openai_error_body
from exo_trio.api.generation import Timing, failure_error
from exo_trio.api.sampling import build_params
from exo_trio.api.sse import DONE, KEEPALIVE, sse_data
from exo_trio.api.stream_response import StreamEncoder
from exo_trio.types import (
    ChunkGenerated,
    GenerationFailed,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
    TokenLogprob,
)


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # no obfuscation padding is ever sent


class OpenAISampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields chat completions and completions take alike. Unknown fields are a
    400 naming them, as OpenAI's API answers (api/fields.py)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    # Extensions (as in vLLM): keep generating past EOS for exact-length
    # benchmarks, top-k and min-p sampling, a repeat penalty.
    ignore_eos: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def openai_params(
    body: OpenAISampling, max_tokens: int, logprobs: int | None = None
) -> SamplingParams:
    if body.n not in (None, 1):
        raise ApiError(400, "Only n=1 is supported.", param="n")
    return build_params(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        logit_bias=body.logit_bias,
        ignore_eos=body.ignore_eos,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repetition_penalty,
        repeat_last_n=-1 if body.repetition_penalty is not None else None,
        logprobs=logprobs,
        names={"logprobs": "top_logprobs"},
    )


def token_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def logprob_entry(chunk: ChunkGenerated) -> dict[str, object]:
    """One token's entry in OpenAI chat's `logprobs.content` (and Responses')."""
    chosen = chunk.logprob
    assert chosen is not None

    def entry(t: TokenLogprob) -> dict[str, object]:
        return {"token": token_text(t.raw), "logprob": t.logprob, "bytes": list(t.raw)}

    return {**entry(chosen), "top_logprobs": [entry(t) for t in chunk.top_logprobs]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, object]:
    """OpenAI's usage object; `cached_tokens` are the prompt tokens the runner's
    prefix cache supplied (counted in prompt_tokens too, as OpenAI does)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class OpenAIChunks(StreamEncoder):
    """The chunk stream; subclasses say what a choice looks like."""

    object = ""

    def __init__(self, command: TextGeneration, created: int, include_usage: bool) -> None:
        self.command = command
        self.created = created
        self.include_usage = include_usage

    def choice(self, text: str | None, finish_reason: str | None) -> dict[str, object]:
        raise NotImplementedError

    def chunk(self, choices: list[dict[str, object]], usage: object = None) -> bytes:
        payload: dict[str, object] = {
            "id": self.command.request_id,
            "object": self.object,
            "created": self.created,
            "model": self.command.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        # With include_usage OpenAI puts `"usage": null` on every chunk but the last.
        if self.include_usage:
            payload["usage"] = usage
        return sse_data(payload)

    def keepalive(self) -> list[bytes]:
        return [KEEPALIVE]

    def text(self, text: str) -> list[bytes]:
        return [self.chunk([self.choice(text, None)])]

    def finish(self, event: GenerationFinished, timing: Timing) -> list[bytes]:
        out = [self.chunk([self.choice(None, event.finish_reason)])]
        if self.include_usage:
            out.append(
                self.chunk(
                    [], usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                )
            )
        return [*out, DONE]

    def fail(self, event: GenerationFailed, timing: Timing) -> list[bytes]:
        # After a 200 the only way to report an error is in the stream; the
        # openai client raises APIError on a `data: {"error": ...}` event.
        return [sse_data(openai_error_body(failure_error(event)))]
