"""A download's progress on the terminal: a tqdm bar when the stream is a terminal,
else a line every few seconds (logs, pipes, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

LINE_INTERVAL = 5.0  # seconds between progress lines when not on a terminal


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class ProgressBar:
    def __init__(self, description: str, stream: TextIO | None = None) -> None:
        self.description = description
        self.stream = stream or sys.stderr
        self._bar = None
        self._last_line = 0.0
        self._started = time.monotonic()
        self._shown = (-1, -1)
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=0,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc=description,
                file=self.stream,
                dynamic_ncols=True,
            )

    def show(self, completed: int, total: int) -> None:
        if (completed, total) == self._shown:
            return
        self._shown = (completed, total)
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = completed
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line >= LINE_INTERVAL or (total and completed >= total):
            self._last_line = now
            self.stream.write(self.line(completed, total, now - self._started) + "\n")
            self.stream.flush()

    def line(self, completed: int, total: int, elapsed: float) -> str:
        share = f"{100 * completed / total:.0f}% of {human_bytes(total)}" if total else "starting"
        rate = human_bytes(completed / elapsed) + "/s" if elapsed > 0 else ""
        return f"{self.description}: {share} {rate}".rstrip()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
