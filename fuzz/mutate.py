"""A JSON-aware mutator, driven by any source of choices.

Byte-level mutation of a JSON request body almost always yields a parse error, so
the validation code behind the parser is never reached. This mutator parses the
body, changes the value tree the way hostile or careless clients do (a wrong type,
a huge or negative number, a missing or unknown field, deep nesting, strange
strings) and serializes it again; a few operations work on the text (invalid
UTF-8 inside a string, a duplicated key, a number too large for a float).

Every decision is `choices.below(n)`, with 0 the simplest choice, so the same code
serves libFuzzer (atheris's custom mutator, choices from a seeded Random) and
hypothesis (choices drawn from its data, so failures shrink toward simple inputs).
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any, Protocol


class Choices(Protocol):
    def below(self, n: int) -> int:
        """A choice in [0, n)."""
        ...


class RandomChoices:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def below(self, n: int) -> int:
        return self.rng.randrange(n) if n > 0 else 0


# Fields any dialect knows, so "add a field" reaches real validation code.
FIELDS = (
    "model messages prompt input stream max_tokens max_completion_tokens max_output_tokens "
    "temperature top_p top_k seed stop stop_sequences logit_bias ignore_eos n user "
    "stream_options include_usage echo suffix logprobs best_of system instructions "
    "previous_response_id tools text format store metadata options num_predict raw "
    "template context images keep_alive think role content type name tool_calls thinking "
    "tool_choice verbose"
).split()

INTERESTING: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    255,
    4096,
    65536,
    2**31,
    2**53 + 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    0.5,
    -0.0,
    1e-320,
    1e308,
    -1e308,
    "",
    "0",
    "demo",
    "demo:latest",
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "text",
    "input_text",
    "image",
    "message",
    "\x00",
    "\r\n\r\n",
    "data: [DONE]\n\n",
    "\u2028\u2029",
    "\ud83d\ude00",
    "\ufeff",
    "x" * 3000,
    [],
    {},
    [1, 2, 3],
    [""],
    {"type": "text", "text": "hi"},
    {"role": "user", "content": "hi"},
    [{"type": "text", "text": "x"}],
    [{"role": "user", "content": "hi"}],
    {"1": -100},
    {"-1": 5},
    {"x": 1},
    {"num_predict": 3},
    {"include_usage": True},
)

# Raw text that json.dumps cannot produce but a client can send.
RAW_VALUES = (
    b"1e999",
    b"-1e999",
    b"1" * 400,
    b"0.0000000000000000000000000000001e-400",
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',
    b'"\xc0\xaf"',
    b"[" * 3000 + b"]" * 3000,
    b'{"a":' * 2000 + b"1" + b"}" * 2000,
    b"NaN",
    b"Infinity",
    b"tru",
    b'"\\u0000"',
)


def mutate(data: bytes, choices: Choices, *, header: int = 0) -> bytes:
    """One mutation of `data`, whose first `header` bytes are control bytes (kept
    apart from the JSON body) and whose rest is, ideally, JSON."""
    head, body = data[:header], data[header:]
    op = choices.below(8)
    if op == 0 and header:
        return mutate_header(head, choices) + body
    try:
        tree = json.loads(body)
    except (ValueError, RecursionError):
        return head + mutate_bytes(body, choices)
    if op in (1, 2, 3, 4):
        tree = mutate_tree(tree, choices)
        return head + dump(tree, choices)
    if op == 5:
        return head + mutate_text(dump(tree, choices), choices)
    if op == 6:
        # Several tree mutations at once: most bugs need two things wrong together.
        for _ in range(1 + choices.below(4)):
            tree = mutate_tree(tree, choices)
        return head + dump(tree, choices)
    return head + mutate_bytes(body, choices)


def mutate_header(head: bytes, choices: Choices) -> bytes:
    if not head:
        return head
    i = choices.below(len(head))
    value = choices.below(256)
    return head[:i] + bytes([value]) + head[i + 1 :]


def dump(tree: Any, choices: Choices) -> bytes:
    return json.dumps(tree, ensure_ascii=bool(choices.below(2))).encode("utf-8", "surrogatepass")


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every node of a JSON tree, by path (the root is the empty path)."""
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += paths(value, (*prefix, i))
    return found


def get(tree: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def put(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    get(tree, path[:-1])[path[-1]] = value
    return tree


def pick(seq: Any, choices: Choices) -> Any:
    return seq[choices.below(len(seq))]


def fresh(choices: Choices) -> Any:
    """An interesting value, copied: the tree is mutated in place later, and the
    table must not change between inputs (hypothesis replays must be exact)."""
    return copy.deepcopy(pick(INTERESTING, choices))


def mutate_tree(tree: Any, choices: Choices) -> Any:
    nodes = paths(tree)
    path = pick(nodes, choices)
    node = get(tree, path)
    op = choices.below(9)
    if op == 0:
        return put(tree, path, fresh(choices))
    if op == 1 and isinstance(node, dict) and node:
        del node[pick(list(node), choices)]
        return tree
    if op == 2:
        objects = [p for p in nodes if isinstance(get(tree, p), dict)]
        if objects:
            target = get(tree, pick(objects, choices))
            target[pick(FIELDS, choices)] = fresh(choices)
        return tree
    if op == 3:
        return put(tree, path, [node] if choices.below(2) else {"value": node})
    if op == 4 and isinstance(node, list):
        node.append(node[0] if node else fresh(choices))
        return tree
    if op == 5 and isinstance(node, (int, float)) and not isinstance(node, bool):
        deltas = (1, -1, 2**32, -(2**32), 0.5)
        return put(tree, path, -node if choices.below(2) else node + pick(deltas, choices))
    if op == 6 and isinstance(node, str):
        suffixes = ("\x00", "\ud83d\ude00", " " * 64, "\u202e", ":latest", node * 50)
        return put(tree, path, node + pick(suffixes, choices))
    if op == 7:
        # Copy another subtree here (a message where a string was, and so on).
        return put(tree, path, json.loads(json.dumps(get(tree, pick(nodes, choices)))))
    return put(tree, path, fresh(choices))


def mutate_text(text: bytes, choices: Choices) -> bytes:
    op = choices.below(4)
    if op == 0:
        # Replace a value somewhere (after a colon) with raw text.
        colons = [i for i, c in enumerate(text) if c == ord(":")]
        if colons:
            at = pick(colons, choices) + 1
            end = at
            while end < len(text) and text[end] not in b",}]":
                end += 1
            return text[:at] + pick(RAW_VALUES, choices) + text[end:]
    if op == 1 and text.startswith(b"{"):
        # A duplicated key: the last one wins in most parsers.
        return b'{"model": ' + pick(RAW_VALUES, choices) + b", " + text[1:]
    if op == 2:
        quotes = [i for i, c in enumerate(text) if c == ord('"')]
        if quotes:
            at = pick(quotes, choices) + 1
            return text[:at] + pick((b"\xff", b"\xed\xa0\x80", b"\\", b"\x00"), choices) + text[at:]
    return text[: choices.below(len(text) + 1)]


def mutate_bytes(data: bytes, choices: Choices) -> bytes:
    op = choices.below(4)
    if op == 0 or not data:
        at = choices.below(len(data) + 1)
        return data[:at] + bytes([choices.below(256)]) + data[at:]
    at = choices.below(len(data))
    if op == 1:
        return data[:at] + data[at + 1 :]
    if op == 2:
        return data[:at] + bytes([choices.below(256)]) + data[at + 1 :]
    return data[:at] + data[at:] * 2
