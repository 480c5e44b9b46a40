"""Replay files: one run's recorded choice list and what is needed to rerun it.

A replay file is JSON. `choices` is the whole recorded list; `policy`,
`scenario`, `nodes`, `dialects` and `mutant` say how to run it; `expect` says
what a replay must show ("pass": the run is healthy, as every regression entry
must be once its bug is fixed; "fail" with a `mutant`: with that bug applied, the
run must violate `violation`, and pass without it; "fail" without one: a bug
found and not fixed yet, the run must still violate `violation`, until the fix
flips the entry to "pass"). `digest` is the
trace digest the run had when it was recorded (a replay on the same code
reproduces it; a change to the code may legitimately change it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT = "exo-trio-sim/1"
CORPUS = Path(__file__).resolve().parent / "corpus"


@dataclass
class Replay:
    choices: list[int]
    policy: str = "native"
    dialects: list[str] = field(default_factory=list)
    mutant: str | None = None
    expect: Literal["pass", "fail"] = "pass"
    violation: str | None = None
    digest: str | None = None
    seed: int | None = None
    note: str = ""
    nodes: int = 2
    scenario: str = "default"

    def to_json(self) -> str:
        data: dict[str, Any] = {"format": FORMAT, **asdict(self)}
        choices = data.pop("choices")
        # One line for the metadata-like fields, the (long) list last.
        return json.dumps({**data, "choices": choices}, separators=(",", ":")) + "\n"

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path


def load(path: Path) -> Replay:
    data = json.loads(path.read_text())
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} replay file")
    return Replay(**data)


def corpus_files(directory: Path = CORPUS) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []
