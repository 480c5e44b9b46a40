"""POST /bench/chat/completions: a chat completion plus how fast it was made.

Non-streaming only: the statistics describe the whole request, and a benchmark
client wants one object per request. Times are measured on the node with
Trio's clock, from dispatch to the first token (prefill, and any wait for a
batch slot) and from the first token to the last (decode).
"""

from __future__ import annotations

from quart import Response

from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError
from exo_trio.api.generation import Completion, json_response
from exo_trio.api.openai_chat import chat_completion, parse_chat_request


def generation_stats(result: Completion) -> dict[str, object]:
    timing = result.timing
    prefill, decode = timing.prefill_seconds, timing.decode_seconds
    # The first token comes out of prefill; the decode rate counts the steps after it.
    decoded = max(0, result.completion_tokens - 1)
    return {
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "completion_tokens": result.completion_tokens,
        "time_to_first_token_s": round(prefill, 6),
        "decode_s": round(decode, 6),
        "total_s": round(timing.total_seconds, 6),
        "prompt_tps": round(result.prompt_tokens / prefill, 3) if prefill > 0 else None,
        "decode_tps": round(decoded / decode, 3) if decode > 0 and decoded else None,
    }


async def bench_chat_completions(ctx: ApiContext) -> Response:
    body, command, setup = parse_chat_request(ctx.node, await ctx.body())
    if body.stream:
        raise ApiError(400, "The bench endpoint does not stream.", param="stream")
    ctx.begin(command)
    created = int(ctx.node.seams.wall_clock())
    result = await ctx.complete(command)
    payload = chat_completion(command, created, result, setup)
    payload["generation_stats"] = generation_stats(result)
    return json_response(payload, command)
