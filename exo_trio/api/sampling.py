"""Sampling parameters as every dialect spells them, checked once.

Each dialect names its knobs differently (max_tokens, max_output_tokens,
num_predict; stop, stop_sequences) and allows different ranges; the adapters
translate names and pass their limits here, so the checks and the error messages
are the same everywhere.
"""

from __future__ import annotations

import math

from exo_trio.api.errors import ApiError
from exo_trio.types import SamplingParams

# OpenAI's logit_bias of -100 means "ban"; make it a hard ban, not a large penalty.
BAN = -1e9
# Integers travel to the runner as msgpack, which carries [-2**63, 2**64). JSON does
# not stop a client at that range, and an unencodable command once took the whole
# node down (found by fuzz/), so every client-chosen integer is checked here.
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
MAX_TOKEN_ID = 2**31 - 1
# OpenAI's limit on top_logprobs; every dialect's logprobs are held to it.
MAX_TOP_LOGPROBS = 20


def parse_logit_bias(raw: dict[str, float] | None, param: str = "logit_bias") -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias key `{key}` is not a token id.", param=param) from None
        if not 0 <= token <= MAX_TOKEN_ID:
            raise ApiError(400, f"logit_bias key `{key}` is not a token id.", param=param)
        if not -100.0 <= value <= 100.0:
            raise ApiError(400, "logit_bias values must be in [-100, 100].", param=param)
        bias[token] = BAN if value <= -100.0 else value
    return bias


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def build_params(
    *,
    max_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    logit_bias: dict[str, float] | None = None,
    ignore_eos: bool = False,
    max_temperature: float = 2.0,
    max_stops: int | None = 4,
    names: dict[str, str] | None = None,
    defaults: tuple[float, float] = (1.0, 1.0),
    min_p: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repeat_penalty: float | None = None,
    repeat_last_n: int | None = None,
    logprobs: int | None = None,
) -> SamplingParams:
    """Validate and build SamplingParams. A None temperature or top_p takes the
    dialect's `defaults` (temperature, top_p). `names` maps our field names onto
    the dialect's, so an error points at the field the client actually sent."""
    names = names or {}
    if temperature is None:
        temperature = defaults[0]
    if top_p is None:
        top_p = defaults[1]

    def name(field: str) -> str:
        return names.get(field, field)

    if max_tokens < 1:
        raise ApiError(400, f"{name('max_tokens')} must be at least 1.", param=name("max_tokens"))
    if not (math.isfinite(temperature) and 0.0 <= temperature <= max_temperature):
        raise ApiError(
            400,
            f"temperature must be between 0 and {max_temperature:g}.",
            param=name("temperature"),
        )
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, "top_p must be greater than 0 and at most 1.", param=name("top_p"))
    if top_k is not None and not 0 <= top_k <= MAX_TOKEN_ID:
        raise ApiError(400, f"top_k must be in [0, {MAX_TOKEN_ID}].", param=name("top_k"))
    if seed is not None and not INT64_MIN <= seed <= UINT64_MAX:
        raise ApiError(400, "seed must be a 64-bit integer.", param=name("seed"))
    if min_p is not None and not (math.isfinite(min_p) and 0.0 <= min_p <= 1.0):
        raise ApiError(400, "min_p must be between 0 and 1.", param=name("min_p"))
    for field, value in (
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ):
        if value is not None and not (math.isfinite(value) and -2.0 <= value <= 2.0):
            raise ApiError(400, f"{name(field)} must be between -2 and 2.", param=name(field))
    if repeat_penalty is not None and not (math.isfinite(repeat_penalty) and repeat_penalty >= 0):
        raise ApiError(400, "repeat_penalty must be a number >= 0.", param=name("repeat_penalty"))
    if repeat_last_n is not None and not -1 <= repeat_last_n <= MAX_TOKEN_ID:
        raise ApiError(400, "repeat_last_n must be -1 or more.", param=name("repeat_last_n"))
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(
            400,
            f"{name('logprobs')} must be between 0 and {MAX_TOP_LOGPROBS}.",
            param=name("logprobs"),
        )
    stops = stop or []
    if (max_stops is not None and len(stops) > max_stops) or any(not s for s in stops):
        limit = f"at most {max_stops} " if max_stops is not None else ""
        raise ApiError(400, f"{name('stop')} takes {limit}non-empty strings.", param=name("stop"))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k or 0,
        seed=seed,
        stop=tuple(stops),
        logit_bias=parse_logit_bias(logit_bias, name("logit_bias")),
        ignore_eos=ignore_eos,
        min_p=min_p or 0.0,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        repeat_penalty=1.0 if repeat_penalty is None else repeat_penalty,
        repeat_last_n=64 if repeat_last_n is None else repeat_last_n,
        logprobs=logprobs,
    )
