"""The prefix cache (runner/prefix_cache.py) and starting requests together
(runner/prefill.py): alone, and through the engine on the demo model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from exo_trio.runner.engine import Engine
from exo_trio.runner.prefix_cache import PrefixCache, common_prefix, kv_bytes_per_token
from exo_trio.types import (
    ChunkGenerated,
    GenerationEvent,
    GenerationFinished,
    SamplingParams,
    TextGeneration,
)

# -- the cache alone, on synthetic KV ---------------------------------------------------

LAYERS, HEADS, DIM = 2, 2, 4
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # keys and values, float32


def kv_for(tokens: list[int]) -> list[KVCache]:
    """A cache whose every position's keys and values encode its token, so a cut
    can be checked position by position."""
    layers = []
    for layer in range(LAYERS):
        cache = KVCache()
        values = mx.array(tokens, dtype=mx.float32).reshape(1, 1, -1, 1) + layer
        block = mx.broadcast_to(values, (1, HEADS, len(tokens), DIM))
        cache.update_and_fetch(block, block * 2)
        layers.append(cache)
    return layers


def test_common_prefix() -> None:
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([1, 2, 3, 4, 5], [1, 2, 9, 4, 5]) == 2
    long = list(range(5000))
    assert common_prefix(long, [*long[:3333], -1]) == 3333


def test_lookup_finds_the_longest_prefix_and_cuts_it() -> None:
    cache = PrefixCache(1000, BYTES_PER_TOKEN)
    assert cache.lookup([1, 2, 3]) is None
    cache.store([1, 2, 3, 4, 5], kv_for([1, 2, 3, 4, 5]))
    cache.store([1, 2, 9, 9], kv_for([1, 2, 9, 9]))
    hit = cache.lookup([1, 2, 3, 4, 7, 7])
    assert hit is not None and hit.tokens == 4
    layers = hit.layers()
    assert [c.offset for c in layers] == [4, 4]
    assert layers[1].keys[0, 0, :, 0].tolist() == [2, 3, 4, 5]  # tokens 1..4, layer 1
    assert hit.layers(2)[0].values[0, 1, :, 3].tolist() == [2, 4]
    # The whole prompt cached: its last token is still left to compute.
    hit = cache.lookup([1, 2, 3, 4, 5])
    assert hit is not None and hit.tokens == 4
    assert cache.lookup([7, 1, 2]) is None


def test_a_hit_never_changes_the_entry() -> None:
    cache = PrefixCache(1000, BYTES_PER_TOKEN)
    cache.store([1, 2, 3, 4], kv_for([1, 2, 3, 4]))
    hit = cache.lookup([1, 2, 3, 4, 5])
    assert hit is not None
    for layer in hit.layers(2):  # grow a cut copy over the entry's positions 2, 3
        block = mx.full((1, HEADS, 3, DIM), -1.0)
        layer.update_and_fetch(block, block)
        assert layer.offset == 5
    again = cache.lookup([1, 2, 3, 4, 5])
    assert again is not None
    assert again.layers()[0].keys[0, 0, :, 0].tolist() == [1, 2, 3, 4]


def test_entries_are_exact_copies_within_the_token_bound() -> None:
    cache = PrefixCache(10, BYTES_PER_TOKEN)
    big = KVCache()  # a cache with spare room, as a decoding cache has
    block = mx.ones((1, HEADS, 6, DIM))
    big.update_and_fetch(block, block)
    assert big.keys.shape[2] == KVCache.step  # 256 rows allocated, 6 used
    cache.store(list(range(6)), [big] * LAYERS)
    assert cache.tokens_held == 6 and cache.bytes_held == 6 * BYTES_PER_TOKEN
    assert kv_bytes_per_token([big] * LAYERS) == BYTES_PER_TOKEN
    cache.store(list(range(100, 105)), kv_for(list(range(100, 105))))  # 11 > 10: evict LRU
    assert cache.entries() == [tuple(range(100, 105))]
    assert cache.evictions == 1 and cache.tokens_held == 5
    cache.store(list(range(11)), kv_for(list(range(11))))  # larger than the whole cache
    assert cache.entries() == [tuple(range(100, 105))]
    with pytest.raises(ValueError):
        cache.store([1, 2], kv_for([1, 2, 3]))


def test_lru_order_and_redundant_prefixes() -> None:
    cache = PrefixCache(12, BYTES_PER_TOKEN)
    cache.store([1, 2], kv_for([1, 2]))
    cache.store([5, 6, 7], kv_for([5, 6, 7]))
    cache.store([1, 2, 3, 4], kv_for([1, 2, 3, 4]))  # [1, 2] is a prefix: dropped
    assert cache.entries() == [(5, 6, 7), (1, 2, 3, 4)]
    cache.store([5, 6], kv_for([5, 6]))  # already covered by [5, 6, 7]: refreshed
    assert cache.entries() == [(1, 2, 3, 4), (5, 6, 7)]
    assert cache.lookup([1, 2, 3, 0]) is not None  # used: most recent
    cache.store([8, 8, 8, 8, 8, 8], kv_for([8] * 6))  # 13 tokens: the LRU one goes
    assert cache.entries() == [(1, 2, 3, 4), (8, 8, 8, 8, 8, 8)]
    cache.resize(6)
    assert cache.entries() == [(8, 8, 8, 8, 8, 8)]
    assert cache.bytes_held == 6 * BYTES_PER_TOKEN <= cache.capacity_bytes


# -- through the engine -----------------------------------------------------------------


@pytest.fixture
def warm(demo_model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(demo_model_dir, "demo", max_batch=16)
    yield engine
    engine.fail_all("cancelled", "test teardown")


@pytest.fixture
def cold(demo_model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(demo_model_dir, "demo", max_batch=16, prompt_cache_bytes=0)
    yield engine
    engine.fail_all("cancelled", "test teardown")


def greedy(rid: str, prompt: list[int], max_tokens: int, **params: object) -> TextGeneration:
    return TextGeneration(
        request_id=rid,
        model="demo",
        prompt_tokens=prompt,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            **params,  # type: ignore[arg-type]
        ),
    )


Outcome = tuple[list[int], GenerationFinished, int]  # tokens, final event, first token's step


def run(engine: Engine, *commands: TextGeneration, check_bound: bool = False) -> dict[str, Outcome]:
    """Submit the commands together and step until they are done (other requests
    already in the engine decode alongside)."""
    for command in commands:
        assert engine.submit(command) == []
    ids = {c.request_id for c in commands}
    events: dict[str, list[GenerationEvent]] = {rid: [] for rid in ids}
    first: dict[str, int] = {}
    while ids & engine.active:
        for event in engine.step():
            if event.request_id in ids:
                events[event.request_id].append(event)
            if isinstance(event, ChunkGenerated) and event.seq == 0:
                first[event.request_id] = engine.steps
        if check_bound:
            stats = engine.prompt_cache_stats()
            assert stats.bytes <= stats.capacity_bytes
            cache = engine.prompt_cache
            assert stats.bytes == cache.tokens_held * cache.bytes_per_token
    out = {}
    for rid, got in events.items():
        final = got[-1]
        assert isinstance(final, GenerationFinished)
        tokens = [e.token for e in got if isinstance(e, ChunkGenerated)]
        assert len(tokens) == final.completion_tokens
        out[rid] = (tokens, final, first[rid])
    return out


def chat(engine: Engine, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def follow_up(engine: Engine, prompt: list[int], answer: list[int], text: str) -> list[int]:
    """The next turn of a conversation: everything so far, then more."""
    return [*prompt, *answer, *engine.tokenizer.encode(text)]


def both(warm: Engine, cold: Engine, *commands: TextGeneration) -> dict[str, Outcome]:
    """Run on the engine with a cache and on one without; greedy output must agree
    token for token. Returns the cached engine's outcomes."""
    hot = run(warm, *commands)
    reference = run(cold, *commands)
    for rid, (tokens, final, _) in hot.items():
        assert tokens == reference[rid][0], rid
        assert reference[rid][1].cached_tokens == 0
        assert final.prompt_tokens == reference[rid][1].prompt_tokens
    return hot


def test_a_conversation_hits_the_cache_and_gives_the_same_tokens(
    warm: Engine, cold: Engine
) -> None:
    """Every turn extends the last one: each start path (alone, joining a decoding
    request, a burst) reuses the cached turns and generates exactly what a cold
    engine does."""
    prompt = chat(warm, "Tell me a story about a fox.")
    first = both(warm, cold, greedy("t1", prompt, 16))
    assert first["t1"][1].cached_tokens == 0
    # Alone: the lone start path (solo.py) on top of the cached turn.
    prompt2 = follow_up(warm, prompt, first["t1"][0], "\nAnd then what happened?")
    second = both(warm, cold, greedy("t2", prompt2, 16))
    reused = second["t2"][1].cached_tokens
    assert len(prompt) < reused < len(prompt2)
    # Joining: a request already decodes when the next turn comes.
    prompt3 = follow_up(warm, prompt2, second["t2"][0], "\nWhy?")
    for engine in (warm, cold):
        engine.submit(greedy("other", chat(engine, "unrelated"), 30))
        for _ in range(3):
            engine.step()
    third = both(warm, cold, greedy("t3", prompt3, 12))
    assert third["t3"][1].cached_tokens > reused
    # A burst: several continuations of the same conversation start together.
    branches = [follow_up(warm, prompt3, third["t3"][0], f"\nOption {i}" * i) for i in range(4)]
    burst = both(warm, cold, *(greedy(f"b{i}", p, 8) for i, p in enumerate(branches)))
    assert all(burst[f"b{i}"][1].cached_tokens > third["t3"][1].cached_tokens for i in range(4))
    stats = warm.prompt_cache_stats()
    assert stats.hits >= 6 and stats.tokens_reused > 4 * len(prompt3)
    assert stats.entries >= 1 and 0 < stats.bytes <= stats.capacity_bytes


def test_a_hit_with_logits_processors_is_exact(warm: Engine, cold: Engine) -> None:
    """A request with its own processors (here a logit bias) sees its whole
    prompt as context, cached part included."""
    prompt = chat(warm, "Count the stars.")
    first = both(warm, cold, greedy("a", prompt, 20))
    banned = {t: -1e9 for t in first["a"][0][:3]}
    again = follow_up(warm, prompt, first["a"][0], " More.")
    out = both(warm, cold, greedy("b", again, 20, logit_bias=banned))
    assert out["b"][1].cached_tokens > 0
    assert not set(out["b"][0]) & set(banned)


def test_the_cache_never_exceeds_its_bound(demo_model_dir: Path) -> None:
    """A cache with room for about three requests, fed many: after every step it
    holds at most its bound, and what it reports it holds is what its arrays take."""
    probe = Engine.load(demo_model_dir, "demo", prompt_cache_bytes=0)
    bytes_per_token = probe.prompt_cache.bytes_per_token
    engine = Engine.load(
        demo_model_dir, "demo", max_batch=4, prompt_cache_bytes=100 * bytes_per_token
    )
    assert engine.prompt_cache.capacity_tokens == 100
    words = ["fox", "owl", "cat", "dog", "eel", "bee"]
    for round_ in range(2):
        commands = [
            greedy(f"r{round_}-{w}", chat(engine, f"A story about the {w} " * (1 + round_)), 8)
            for w in words
        ]
        run(engine, *commands, check_bound=True)
    # Cancelled mid-way, a request's KV is kept too, within the bound.
    engine.submit(greedy("cut", chat(engine, "A long story about the fox " * 3), 30))
    for _ in range(4):
        engine.step()
    engine.cancel("cut")
    stats = engine.prompt_cache_stats()
    assert stats.evictions > 0 and 0 < stats.bytes <= stats.capacity_bytes
    assert (
        tuple(chat(engine, "A long story about the fox " * 3))
        == engine.prompt_cache.entries()[-1][: len(chat(engine, "A long story about the fox " * 3))]
    )


def test_a_burst_of_eight_starts_in_one_step(warm: Engine) -> None:
    """Eight requests submitted together (one much longer than the others) all get
    their first token in the same step, on an idle runner and joining a decoding one."""
    prompts = [chat(warm, "word " * (2 + 3 * i)) for i in range(7)]
    prompts.append(chat(warm, "a much longer prompt " * 40))
    out = run(warm, *(greedy(f"idle{i}", p, 6) for i, p in enumerate(prompts)))
    assert {first for _, _, first in out.values()} == {1}
    warm.submit(greedy("running", chat(warm, "already decoding"), 20))
    for _ in range(5):
        warm.step()
    start = warm.steps
    out = run(warm, *(greedy(f"join{i}", [*p, 7], 6) for i, p in enumerate(prompts)))
    firsts = {first for rid, (_, _, first) in out.items() if rid.startswith("join")}
    assert firsts == {start + 1}


def test_a_constrained_request_with_a_hit_is_exact(warm: Engine, cold: Engine) -> None:
    """A grammar's mask (runner/guide.py) follows the request's whole context: the
    same valid JSON with the prompt's start cached, alone and in a burst."""
    from tests.test_engine_sampling import schema_grammar

    prompt = chat(warm, "Give me JSON.")
    both(warm, cold, greedy("seed", prompt, 8))  # the prompt is cached from here on
    grammar = schema_grammar()
    lone = both(warm, cold, greedy("lone", [*prompt, 5], 60, grammar=grammar))
    assert lone["lone"][1].cached_tokens == len(prompt)
    text = warm.tokenizer.decode(lone["lone"][0])
    assert text.startswith("{") and text.endswith("}")
    burst = both(
        warm, cold, *(greedy(f"b{i}", [*prompt, 6 + i], 60, grammar=grammar) for i in range(3))
    )
    assert all(burst[f"b{i}"][1].cached_tokens == len(prompt) for i in range(3))
