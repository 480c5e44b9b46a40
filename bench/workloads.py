"""HTTP workloads for comparing servers that speak OpenAI chat completions.

Every request is greedy with the model's EOS ids banned through `logit_bias`
(every server takes it), so each produces exactly `max_tokens` tokens; the count
is checked against the server's own usage report. Prompts carry a unique first
line per request, so that no prefix cache can serve one workload's prompt from an
earlier one (the multi-turn workload is the one meant to hit caches).
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import dataclass, field

import httpx
import trio

from bench.servers import Server

STORY = "Write a long story about structured concurrency."
_unique = itertools.count()


def unique_messages(content: str = STORY) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"[{next(_unique)}] {content}"}]


@dataclass
class Stream:
    sent: float  # trio.current_time() at send
    stamps: list[float] = field(default_factory=list)  # each chunk with text
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent

    @property
    def decode_tps(self) -> float:
        """Tokens after the first, over the time from first to last (the server's
        usage count, since a chunk may carry no text)."""
        span = self.stamps[-1] - self.stamps[0]
        return (self.completion_tokens - 1) / span if span > 0 else 0.0


async def stream_chat(
    client: httpx.AsyncClient,
    server: Server,
    messages: list[dict[str, str]],
    max_tokens: int,
    ban: dict[str, float],
    on_chunk: trio.Event | None = None,
) -> Stream:
    """One streaming chat completion, timed chunk by chunk."""
    body = {
        "model": server.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": ban,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Stream(sent=trio.current_time())
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            payload = json.loads(line[6:])
            choices = payload.get("choices") or []
            content = (choices[0].get("delta") or {}).get("content") if choices else None
            if content:
                result.stamps.append(trio.current_time())
                result.text += content
                if on_chunk is not None:
                    on_chunk.set()
            usage = payload.get("usage")
            if usage:
                result.completion_tokens = usage["completion_tokens"]
                result.prompt_tokens = usage["prompt_tokens"]
                details = usage.get("prompt_tokens_details") or {}
                result.cached_tokens = details.get("cached_tokens")
    if result.completion_tokens != max_tokens:
        raise RuntimeError(
            f"{server.name}: {result.completion_tokens} tokens, not {max_tokens} (EOS not banned?)"
        )
    return result


def client_for(server: Server, connections: int = 16) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections + 2)
    return httpx.AsyncClient(base_url=server.base_url, timeout=3600, limits=limits)


# -- the workloads (each runs inside trio.run) ------------------------------------------


async def one_stream(server: Server, tokens: int, ban: dict[str, float]) -> Stream:
    async with client_for(server) as client:
        return await stream_chat(client, server, unique_messages(), tokens, ban)


@dataclass
class Burst:
    streams: list[Stream]

    @property
    def firsts(self) -> list[float]:
        return [s.stamps[0] for s in self.streams]

    @property
    def first_token_spread(self) -> float:
        return max(self.firsts) - min(self.firsts)

    @property
    def slowest_first_token(self) -> float:
        return max(s.ttft for s in self.streams)

    @property
    def end_to_end_tps(self) -> float:
        """All tokens over first send to last token."""
        start = min(s.sent for s in self.streams)
        end = max(s.stamps[-1] for s in self.streams)
        return sum(s.completion_tokens for s in self.streams) / (end - start)

    @property
    def steady_tps(self) -> float:
        """Tokens produced after the last stream's first token, over that time: the
        batch decoding with every stream in it."""
        since = max(self.firsts)
        end = max(s.stamps[-1] for s in self.streams)
        after = sum(sum(1 for t in s.stamps if t > since) for s in self.streams)
        # A chunk may carry no text: scale each stream's chunks to its usage count.
        scale = sum(s.completion_tokens for s in self.streams) / sum(
            len(s.stamps) for s in self.streams
        )
        return after * scale / (end - since)


async def burst(server: Server, streams: int, tokens: int, ban: dict[str, float]) -> Burst:
    """`streams` requests sent at once."""
    results: list[Stream] = []
    async with client_for(server, streams) as client:

        async def one() -> None:
            results.append(await stream_chat(client, server, unique_messages(), tokens, ban))

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(one)
    return Burst(results)


@dataclass
class Join:
    ttft: float  # the joining request's
    step: float  # the running stream's median gap between tokens


async def join(server: Server, tokens: int, ban: dict[str, float], after: int = 20) -> Join:
    """A short request sent while another stream decodes (after its `after`-th
    token): its time to first token."""
    async with client_for(server) as client:
        running: list[Stream] = []
        joined = trio.Event()
        result: list[Stream] = []

        async def long_stream() -> None:
            stream = Stream(sent=trio.current_time())
            running.append(stream)
            body = {
                "model": server.model,
                "messages": unique_messages(),
                "max_tokens": tokens * 4,
                "temperature": 0,
                "logit_bias": ban,
                "stream": True,
            }
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content":' in line:
                        payload = json.loads(line[6:])
                        choices = payload.get("choices") or []
                        if choices and (choices[0].get("delta") or {}).get("content"):
                            stream.stamps.append(trio.current_time())
                            if len(stream.stamps) == after:
                                joined.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)
            await joined.wait()
            result.append(await stream_chat(client, server, unique_messages("hi"), 4, ban))
            nursery.cancel_scope.cancel()
    stamps = running[0].stamps
    gaps = [b - a for a, b in itertools.pairwise(stamps[5:after])]
    return Join(result[0].ttft, statistics.median(gaps))


async def abandoned(
    server: Server, tokens: int, ban: dict[str, float], after: float = 1.0, settle: float = 1.0
) -> float:
    """CPU seconds the server burns after a non-streaming client goes away `after`
    seconds into a long request: until its CPU use stays below 5% of a core for
    `settle` seconds (at most 120 s), less what it burns idle meanwhile."""
    idle_rate = await _idle_cpu_rate(server)
    body = {
        "model": server.model,
        "messages": unique_messages(),
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": ban,
    }
    async with client_for(server) as client:
        with trio.move_on_after(after):
            await client.post("/v1/chat/completions", json=body)
            raise RuntimeError(f"{server.name} finished {tokens} tokens within {after}s")
    gone = trio.current_time()
    start_cpu = server.cpu_seconds()
    last_cpu, last_t = start_cpu, gone
    while trio.current_time() - gone < 120:
        await trio.sleep(settle)
        cpu, now = server.cpu_seconds(), trio.current_time()
        if cpu - last_cpu < 0.05 * (now - last_t):
            break
        last_cpu, last_t = cpu, now
    return max(0.0, last_cpu - start_cpu - idle_rate * (last_t - gone))


async def _idle_cpu_rate(server: Server, seconds: float = 2.0) -> float:
    before = server.cpu_seconds()
    await trio.sleep(seconds)
    return (server.cpu_seconds() - before) / seconds
