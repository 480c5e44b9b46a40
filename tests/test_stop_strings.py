"""StopStringMatcher: examples plus a property test over arbitrary splits."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from exo_trio.runner.stop_strings import StopStringMatcher, first_stop


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """Feed pieces until a stop; return everything emitted and whether it stopped."""
    matcher = StopStringMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        safe, stopped = matcher.push(piece)
        out.append(safe)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_no_stops_is_pass_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.push("") == ("", False)
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    assert run(["", ""], ["a", "b"]) == ("ab", False)


def test_stop_inside_one_piece() -> None:
    assert run(["END"], ["hello END world"]) == ("hello ", True)


def test_stop_split_across_pieces_is_held_back() -> None:
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("abc<") == ("abc", False)
    assert matcher.held == "<"
    assert matcher.push("/") == ("", False)
    assert matcher.push("s>tail") == ("", True)
    # Nothing more once stopped.
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_false_start_is_released() -> None:
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("a</") == ("a", False)
    assert matcher.push("x") == ("</x", False)
    assert matcher.flush() == ""


def test_flush_returns_held_text() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.flush() == "ST"


def test_earliest_completion_wins() -> None:
    # "bc" completes before "abcd" does, so it decides, although "abcd" starts first.
    assert run(["abcd", "bc"], ["a", "b", "c", "d"]) == ("a", True)
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True)
    # Same end: the longer (earlier-starting) stop wins.
    assert run(["c", "bc"], ["abcd"]) == ("a", True)


def test_overlapping_prefix_hold() -> None:
    # "aab": after "aa" the suffix "a" and "aa" are both possible starts.
    assert run(["aab"], ["a", "a", "a", "b", "x"]) == ("a", True)


def test_unicode() -> None:
    assert run(["👋🌍"], ["héllo 👋", "🌍!"]) == ("héllo ", True)


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    start = first_stop(text, stops)
    return (text, False) if start is None else (text[:start], True)


@st.composite
def text_and_split(draw: st.DrawFn) -> tuple[list[str], str, list[str]]:
    # A small alphabet makes stop strings, partial matches and overlaps frequent.
    alphabet = st.sampled_from("abc é\n")
    stops = draw(st.lists(st.text(alphabet, min_size=0, max_size=4), max_size=3))
    text = draw(st.text(alphabet, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return stops, text, pieces


@settings(max_examples=400, deadline=None)
@given(text_and_split())
def test_split_does_not_matter(case: tuple[list[str], str, list[str]]) -> None:
    stops, text, pieces = case
    emitted, stopped = run(stops, pieces)
    expected, expected_stopped = reference(stops, text)
    assert stopped == expected_stopped
    assert emitted == expected
    if not stopped:
        # No stop: emitted text plus the flushed tail is exactly the full text.
        assert emitted == text
    else:
        # A stop: no stop string occurs in what was emitted.
        assert all(not s or s not in emitted for s in stops)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=5), max_size=10))
def test_pass_through_property(pieces: list[str]) -> None:
    matcher = StopStringMatcher([])
    assert [matcher.push(p) for p in pieces] == [(p, False) for p in pieces]
