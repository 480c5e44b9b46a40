"""Silencing loggers while a fuzz harness runs, and putting them back after.

Harnesses run in the test process too: a level left raised would hide log lines
that later tests assert on (it did: tests/test_links.py checks refusal messages).
"""

from __future__ import annotations

import logging
from collections.abc import Callable


def quiet(levels: dict[str, int]) -> Callable[[], None]:
    """Set each named logger's level; return a function that restores them."""
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)

    def restore() -> None:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)

    return restore
