"""What a node knows about models beyond the ones it serves: its store on disk,
the downloads in flight, and how much memory the cluster has to run them in.

The API's model management (Ollama's /api/pull, /api/delete, /api/tags, the CLI's
`pull`, `ls`, `rm`) works on this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exo_trio.downloads import Download, Downloads
from exo_trio.hub_plan import HubRef
from exo_trio.model_info import describe_model_dir
from exo_trio.model_store import ModelStore, StoredModel
from exo_trio.placement import memory_shortfall


@dataclass
class ModelCatalog:
    store: ModelStore
    downloads: Downloads
    # The free memory of every node of the cluster (bytes), this node's first.
    cluster_memory: Callable[[], list[int]]

    def fits(self, name: str, size_bytes: int) -> str | None:
        return memory_shortfall(name, size_bytes, self.cluster_memory())

    def pull(self, ref: HubRef) -> Download:
        """Start (or join) downloading a hub model into the store; `leave` it after."""
        return self.downloads.start(ref, self.fits)

    def downloads_in_flight(self) -> list[dict[str, Any]]:
        return [p.snapshot() for p in self.downloads.in_flight()]


def digest(model: StoredModel) -> str:
    """A stable digest naming the model's content: the commit for a hub model, the
    config and weight files' names and sizes for a directory."""
    if model.repo is not None:
        return "sha256:" + hashlib.sha256(f"{model.repo}@{model.commit}".encode()).hexdigest()
    return describe_model_dir(model.path).digest


def stored_entry(model: StoredModel) -> dict[str, Any]:
    """A store model as the CLI's `ls` and /state show it."""
    return {
        "name": model.name,
        "repo": model.repo,
        "commit": model.commit,
        "path": str(model.path),
        "size": model.size_bytes,
        "complete": model.complete,
        "modified": model.modified,
        "architecture": model.architecture,
    }
