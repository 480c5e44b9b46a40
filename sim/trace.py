"""The run's trace: a digest of everything observable, and (on request) its lines.

Every observable step (a client receiving bytes, the fake runner sending a step, a
fault firing) goes into one running hash, stamped with virtual time and a tick
counter. Two runs with the same choice list must give the same digest, in any
process and under any PYTHONHASHSEED; `--check-determinism` compares them.
"""

from __future__ import annotations

import hashlib

import trio


class Trace:
    def __init__(self, keep_lines: bool = False) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.tick = 0
        self.lines: list[str] | None = [] if keep_lines else None

    def add(self, *fields: object) -> int:
        """Record one step; returns its tick (a total order of recorded steps)."""
        self.tick += 1
        entry = f"{self.tick} {trio.current_time():.6f} {' '.join(map(str, fields))}\n"
        self._hash.update(entry.encode())
        if self.lines is not None:
            self.lines.append(entry[:-1])
        return self.tick

    def digest(self) -> str:
        return self._hash.hexdigest()
