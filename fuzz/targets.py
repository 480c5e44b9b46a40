"""The fuzz targets, by name.

Each target is a factory (imported lazily, so that atheris can instrument the
code under test before it is first imported) returning a harness with
`one(data: bytes)`, which raises on a property violation, and `close()`.
`header` is how many control bytes precede a JSON body (the JSON-aware mutator
leaves them apart); 0 with `json=False` means a raw-bytes target.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CORPUS = Path(__file__).parent / "corpus"


class Harness(Protocol):
    def one(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Target:
    name: str
    factory: str  # "module:function", called with the target's name
    about: str
    json: bool = False
    header: int = 0

    def make(self) -> Harness:
        module, _, function = self.factory.partition(":")
        return getattr(importlib.import_module(module), function)(self.name)  # type: ignore[no-any-return]

    @property
    def corpus(self) -> Path:
        return CORPUS / self.name

    def seeds(self) -> list[bytes]:
        if not self.corpus.is_dir():
            return []
        return [p.read_bytes() for p in sorted(self.corpus.iterdir()) if p.is_file()]


_API = "fuzz.api_targets:make"
TARGETS = {
    t.name: t
    for t in [
        Target("api_openai_chat", _API, "POST /v1/chat/completions and /bench", True, 4),
        Target("api_completions", _API, "POST /v1/completions", True, 4),
        Target("api_responses", _API, "POST /v1/responses", True, 4),
        Target("api_anthropic", _API, "POST /v1/messages and count_tokens", True, 4),
        Target("api_ollama", _API, "POST /api/chat, /api/generate, /api/show", True, 4),
        Target("api_guard", _API, "every route: methods, paths, API key, CORS", True, 4),
        Target(
            "runner_frames",
            "fuzz.frame_targets:make",
            "FrameDecoder on both directions of the runner protocol, any slicing",
        ),
        Target(
            "runner_stream",
            "fuzz.frame_targets:make",
            "a Worker reading what a (broken) runner writes, with requests in flight",
        ),
        Target(
            "link_handshake",
            "fuzz.link_targets:make",
            "a node's link acceptor talking to a hostile peer (websocket messages)",
        ),
        Target(
            "link_frames",
            "fuzz.link_targets:make",
            "data frames after a valid handshake: MACs, kinds, cluster messages",
        ),
        Target("beacons", "fuzz.link_targets:make", "discovery datagrams"),
        Target(
            "sse_roundtrip",
            "fuzz.encoder_targets:make",
            "every dialect's stream encoder, parsed back (SSE and NDJSON)",
        ),
    ]
}
