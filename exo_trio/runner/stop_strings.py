"""Text-level stop sequences (the OpenAI `stop` parameter) over streamed text.

Generated text arrives in pieces (one detokenized segment per token), and a stop
string may straddle any number of pieces. `StopStringMatcher` decides, piece by
piece, which text is safe to send to the client now and which must be held back
because it could be the beginning of a stop string. Nothing after (or inside) a
stop string is ever emitted, however the text is split.

"Where the stop happens" is defined by completion: generation stops at the first
character at which some stop string has been completed. The emitted text is the
text before that stop string's first character. If several stop strings complete
at the same character, the longest one (the earliest start) wins. This is the
only definition that does not depend on how the text is split into pieces: a
streaming matcher cannot wait to see whether a longer stop string that started
earlier will also complete later.

Pure Python, no dependencies, so the runner and the simulator share it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStringMatcher", "first_stop"]


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where a stop in `text` begins (per the completion rule above), or None.

    Used by the matcher on its buffer, and by tests as the reference definition.
    """
    best_end: int | None = None
    best_start = 0
    for stop in stops:
        if not stop:
            continue
        # The first occurrence of a given stop string is also its earliest-ending one.
        start = text.find(stop)
        if start < 0:
            continue
        end = start + len(stop)
        if best_end is None or end < best_end or (end == best_end and start < best_start):
            best_end, best_start = end, start
    return None if best_end is None else best_start


class StopStringMatcher:
    """Incremental stop-string detector for one generation stream.

    `push` returns (text safe to emit now, whether a stop string completed). After
    a stop, every further `push` returns ("", True) and `flush` returns "".
    With no (non-empty) stop strings it is a pass-through and holds nothing back.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        # Empty strings would "match" everywhere; OpenAI ignores them, and so do we.
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        # Every proper prefix of every stop string: a held-back suffix must be one
        # of these. A set lookup per candidate suffix keeps push() O(longest stop).
        self._prefixes: frozenset[str] = frozenset(
            s[:i] for s in self._stops for i in range(1, len(s))
        )
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._stopped = False
        # Which stop string ended the stream (Anthropic reports it as stop_sequence).
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def held(self) -> str:
        """The text currently held back (a possible start of a stop string)."""
        return self._held

    def push(self, text: str) -> tuple[str, bool]:
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        # The held text alone contains no complete stop string (it would have been
        # found by the previous push), so any match here involves the new text.
        start = first_stop(buffer, self._stops)
        if start is not None:
            self._stopped = True
            # The winner starts at `start` and, of the stops starting there, ends first.
            self.matched = min((s for s in self._stops if buffer.find(s) == start), key=len)
            self._held = ""
            return buffer[:start], True
        # Hold back the longest suffix that could still grow into a stop string.
        # It is shorter than the longest stop, so only that many suffixes are checked.
        hold = 0
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            if buffer[-length:] in self._prefixes:
                hold = length
                break
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of generation (finish by length or EOS)."""
        held, self._held = self._held, ""
        return "" if self._stopped else held
