"""The prefix cache: KV state of finished requests, kept for the next request whose
prompt starts with the same tokens (a conversation's next turn, an agent's next
call, the same system prompt again).

One per runner (on a model split across ranks, one per rank, holding that rank's
layers' part). An entry is a sequence of tokens and, for every layer of the
model, the keys and values of exactly those tokens (plain `KVCache`s, copied to
their exact size so that an entry holds nothing else). A lookup finds the entry
sharing the longest prefix with the prompt and hands out a copy cut to that
prefix; entries are never changed after they are stored, so one entry can serve
any number of requests, concurrent ones included.

Bounds, and why they count tokens. The cache holds at most `capacity_tokens`
tokens in all its entries, evicting least recently used entries first. Every
layer's KV grows by the same number of bytes per token, so that is a byte bound
too (`bytes_per_token`, measured on the model's own caches, converts). Counting
tokens rather than bytes keeps the ranks of a split model in agreement: ranks
holding different layers hold different bytes for the same entries, and if each
evicted by its own byte count they could disagree on what is cached, then on
what a request must prefill, and their collectives would no longer match. With
one token capacity for all ranks (the smallest, see rank.py) every rank makes the
same decisions from the same requests.

Only models whose every layer uses mlx-lm's plain `KVCache` are cached: a rotating
(sliding window) cache cannot be cut back to a prefix once it has wrapped, and a
recurrent layer's state cannot be cut at all. `supported()` says why not.

The cache does not count hits itself: the engine decides how much of a hit it
uses (a batch may recompute a few cached tokens, see prefill.py) and counts that.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

__all__ = ["Hit", "PrefixCache", "common_prefix", "kv_bytes_per_token", "supported"]


def supported(cache: Sequence[Any]) -> str | None:
    """None if a model whose fresh cache is `cache` can be prefix cached, else why not."""
    kinds = sorted({type(c).__name__ for c in cache if type(c) is not KVCache})
    if not cache:
        return "the model has no KV cache"
    if kinds:
        return f"its layers use {', '.join(kinds)}, not a plain KVCache"
    return None


def kv_bytes_per_token(cache: Sequence[KVCache]) -> int:
    """Bytes one token adds to a filled cache of these layers (keys and values)."""
    total = 0
    for layer in cache:
        if layer.keys is None:
            raise ValueError("kv_bytes_per_token needs a cache that holds a token")
        for array in (layer.keys, layer.values):
            batch, heads, _, dim = array.shape
            total += batch * heads * dim * array.itemsize
    return total


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (binary search
    over slice comparisons, which run in C: prompts are thousands of tokens)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Entry:
    __slots__ = ("layers", "nbytes", "tokens")

    def __init__(self, tokens: tuple[int, ...], layers: list[tuple[mx.array, mx.array]]) -> None:
        self.tokens = tokens
        self.layers = layers  # (keys, values) per layer, exactly len(tokens) long
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in layers)


@dataclass(frozen=True)
class Hit:
    """The longest cached prefix of a prompt: `tokens` of them."""

    tokens: int
    _entry: _Entry

    def layers(self, length: int | None = None) -> list[KVCache]:
        """Fresh per-layer caches holding the prompt's first `length` tokens (at most
        `tokens`; default all of them). Their arrays are exactly that long, so the
        first update allocates new ones (KVCache grows by concatenation): the entry
        itself is never written to."""
        length = self.tokens if length is None else min(length, self.tokens)
        caches = []
        for keys, values in self._entry.layers:
            cache = KVCache()
            if length > 0:
                cache.keys = keys[..., :length, :]
                cache.values = values[..., :length, :]
                cache.offset = length
            caches.append(cache)
        return caches


class PrefixCache:
    """LRU entries of (tokens, per-layer KV), at most `capacity_tokens` tokens in all."""

    def __init__(self, capacity_tokens: int, bytes_per_token: int) -> None:
        self.capacity_tokens = max(0, capacity_tokens)
        self.bytes_per_token = bytes_per_token
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # LRU first
        self._tokens = 0
        self._bytes = 0  # the entries' arrays, as allocated
        self.evictions = 0

    # -- what it holds ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens_held(self) -> int:
        return self._tokens

    @property
    def bytes_held(self) -> int:
        """The bytes of the arrays the entries hold (tokens_held x bytes_per_token
        for plain KV caches)."""
        return self._bytes

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token

    def entries(self) -> list[tuple[int, ...]]:
        """The cached token sequences, least recently used first."""
        return list(self._entries)

    # -- use ----------------------------------------------------------------------

    def lookup(self, prompt: Sequence[int]) -> Hit | None:
        """The entry sharing the longest prefix with `prompt`, up to all of the
        prompt but its last token (the first generated token is sampled from that
        token's logits, so it is always computed). None on a miss. The entry used
        becomes the most recently used."""
        best: _Entry | None = None
        best_length = 0
        limit = len(prompt) - 1
        key = tuple(prompt)
        # Most recent first, so that of equally long prefixes the newest wins.
        for entry in reversed(self._entries.values()):
            length = min(common_prefix(entry.tokens, key), limit)
            if length > best_length:
                best, best_length = entry, length
        if best is None:
            return None
        self._entries.move_to_end(best.tokens)
        return Hit(best_length, best)

    def store(self, tokens: Sequence[int], cache: Sequence[KVCache]) -> None:
        """Keep a finished request's KV: `cache` holds exactly `tokens` (it is
        copied; the caller may go on using or dropping it). Entries that are
        prefixes of it are dropped (it serves everything they served); if an entry
        already extends it, that entry just becomes the most recently used."""
        key = tuple(tokens)
        if not key or len(key) > self.capacity_tokens:
            return
        for entry in reversed(self._entries.values()):
            if entry.tokens[: len(key)] == key:
                self._entries.move_to_end(entry.tokens)
                return
        for old in [e for e in self._entries if key[: len(e)] == e]:
            self._drop(old)
        layers = []
        for layer in cache:
            if layer.offset != len(key):
                raise ValueError(f"cache holds {layer.offset} tokens, not {len(key)}")
            # Copies of exactly the tokens' rows: a slice would keep the whole
            # buffer (and, lazily, the batch it came from) alive.
            keys = mx.contiguous(layer.keys[..., : len(key), :])
            values = mx.contiguous(layer.values[..., : len(key), :])
            layers.append((keys, values))
        mx.eval(layers)
        entry = self._entries[key] = _Entry(key, layers)
        self._tokens += len(key)
        self._bytes += entry.nbytes
        while self._tokens > self.capacity_tokens:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def resize(self, capacity_tokens: int) -> None:
        """A new capacity, evicting down to it at once."""
        self.capacity_tokens = max(0, capacity_tokens)
        while self._tokens > self.capacity_tokens:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = self._bytes = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self._tokens -= len(entry.tokens)
        self._bytes -= entry.nbytes
