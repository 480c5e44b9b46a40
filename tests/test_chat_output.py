"""The output splitter: text, thinking and tool calls out of streamed text.

Known text through the parser (a model's own markers and call format), split at
every possible place, must give the same parts; and a property: any sequence of
sections, rendered with the markers and cut anywhere, reads back as exactly those
sections, nothing lost or invented.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from exo_trio.chat_output import ChatFormat, OutputSplitter, Part, ToolCall, json_tool_parser
from exo_trio.prompts import HFPromptEncoder

FMT = ChatFormat(
    think_start="<think>",
    think_end="</think>",
    tool_call_start="<tool_call>",
    tool_call_end="</tool_call>",
    tool_format="json_tools",
    tool_parser=json_tool_parser,
)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def split(text: str, cuts: list[int], tools: list | None = TOOLS, thinking: bool = False):
    ids = iter(range(1000))
    splitter = OutputSplitter(FMT, lambda: f"call-{next(ids)}", tools, thinking)
    parts: list[Part] = []
    start = 0
    for cut in [*sorted(cuts), len(text)]:
        parts += splitter.push(text[start:cut])
        start = cut
    return merged(parts + splitter.finish())


def merged(parts: list[Part]) -> list[tuple[str, object]]:
    """Adjacent text of one channel joined (how it was cut must not matter)."""
    out: list[tuple[str, object]] = []
    for part in parts:
        if part.call is not None:
            out.append(("tool", (part.call.name, part.call.arguments)))
        elif out and out[-1][0] == part.channel:
            out[-1] = (part.channel, str(out[-1][1]) + part.text)
        elif part.text:
            out.append((part.channel, part.text))
    return out


KNOWN = (
    '<think>plan: call f</think>Sure.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
    '</tool_call>\n<tool_call>\n{"name": "f", "arguments": {"y": "<"}}\n</tool_call>done'
)
EXPECTED = [
    ("thinking", "plan: call f"),
    ("text", "Sure."),
    ("tool", ("f", {"x": 1})),
    ("text", "\n"),
    ("tool", ("f", {"y": "<"})),
    ("text", "done"),
]


def test_known_text_splits_the_same_wherever_it_is_cut() -> None:
    assert split(KNOWN, []) == EXPECTED
    for cut in range(len(KNOWN)):
        assert split(KNOWN, [cut]) == EXPECTED, cut
    assert split(KNOWN, list(range(len(KNOWN)))) == EXPECTED  # one character at a time


def test_text_streams_as_it_comes_and_only_a_possible_marker_is_held() -> None:
    splitter = OutputSplitter(FMT, lambda: "c", TOOLS)
    assert splitter.push("Hello <") == [Part("text", "Hello ")]
    assert splitter.push("b>") == [Part("text", "<b>")]
    assert splitter.push("x <tool_c") == [Part("text", "x ")]


def test_a_call_that_does_not_parse_comes_back_as_text() -> None:
    assert split("a<tool_call>{not json</tool_call>b", []) == [
        ("text", "a<tool_call>{not json</tool_call>b")
    ]
    assert split("a<tool_call>{broken", []) == [("text", "a<tool_call>{broken")]
    # A whole call cut off by the end of the output (formats such as Mistral's
    # have no end marker) still parses.
    assert split('a<tool_call>{"name": "f", "arguments": {}}', []) == [
        ("text", "a"),
        ("tool", ("f", {})),
    ]


def test_without_tools_a_call_marker_is_text_and_a_prompt_may_open_thinking() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert split(text, [], tools=None) == [("text", text)]
    assert split("deep</think>answer", [], thinking=True) == [
        ("thinking", "deep"),
        ("text", "answer"),
    ]


def test_the_demo_models_own_parser_reads_its_calls(demo_model_dir: Path) -> None:
    fmt = HFPromptEncoder(demo_model_dir).chat_format
    assert fmt.tool_format == "json_tools" and fmt.has_tools and fmt.has_thinking
    splitter = OutputSplitter(fmt, lambda: "c", TOOLS)
    call = '{"name": "f", "arguments": {"a": [1, 2]}}'
    parts = splitter.push(f"<tool_call>\n{call}\n</tool_call>") + splitter.finish()
    assert [(p.call.name, p.call.arguments) for p in parts if p.call] == [("f", {"a": [1, 2]})]


# Model output is decoded UTF-8, so it never holds a lone surrogate (JSON would join a pair).
SAFE = st.text(
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=12
)
SECTION = st.one_of(
    st.tuples(st.just("text"), SAFE.filter(bool)),
    st.tuples(st.just("thinking"), SAFE.filter(bool)),
    st.tuples(
        st.just("tool"),
        st.tuples(st.sampled_from(["f", "g"]), st.dictionaries(SAFE, st.integers(), max_size=2)),
    ),
)


def render(sections: list[tuple[str, object]]) -> str:
    out = []
    for kind, value in sections:
        if kind == "text":
            out.append(str(value))
        elif kind == "thinking":
            out.append(f"<think>{value}</think>")
        else:
            name, arguments = value  # type: ignore[misc]
            out.append(
                "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
            )
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(st.lists(SECTION, max_size=6), st.lists(st.integers(0, 200), max_size=8))
def test_any_rendered_sections_read_back_exactly(
    sections: list[tuple[str, object]], cuts: list[int]
) -> None:
    text = render(sections)
    expected = merged([_part(kind, value) for kind, value in sections])
    assert split(text, [c for c in cuts if c <= len(text)]) == expected


def _part(kind: str, value: object) -> Part:
    if kind == "tool":
        name, arguments = value  # type: ignore[misc]
        return Part("tool", call=ToolCall("x", name, arguments))
    return Part(kind, str(value))  # type: ignore[arg-type]


def test_a_stream_that_fails_first_delivers_what_it_held_back() -> None:
    # Found by the simulator: a call that never closed was held back and lost
    # when the stream ended in an error. Everything generated reaches the client
    # before the error (the unclosed call as text).
    from exo_trio.api.chat_plan import ChatSetup
    from exo_trio.api.generation import Timing
    from exo_trio.api.openai_chat import ChatChunks
    from exo_trio.types import GenerationFailed, SamplingParams, TextGeneration

    command = TextGeneration(
        request_id="r", model="m", prompt_tokens=[1], params=SamplingParams(max_tokens=4)
    )
    encoder = ChatChunks(command, 0, False, ChatSetup(FMT, TOOLS, False, lambda: "c"))
    held = encoder.text('<tool_call>{"name": "f", "argu')
    assert held == []
    failed = GenerationFailed(request_id="r", kind="runner_died", message="gone")
    out = b"".join(encoder.fail(failed, Timing(started=0.0, ended=1.0)))
    assert b"\\u003ctool_call\\u003e" in out or b"<tool_call>" in out
    assert out.index(b"argu") < out.index(b"error")
