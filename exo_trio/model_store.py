"""The node's model store: which models it has on disk, under which names.

Layout (DATA_DIR defaults to ~/.local/share/exo-trio):

    DATA_DIR/models/
        demo/                     the built-in demo model (built on first use)
        NAME/                     any MLX model directory put here: served as NAME
        hub/                      hub downloads, in the Hugging Face cache layout,
                                  when the user has no HF cache of their own:
            models--ORG--NAME/
                blobs/ETAG        file contents (ETAG.incomplete while downloading)
                refs/REVISION     the commit a branch or tag resolved to
                snapshots/COMMIT/ the repo's files, links into blobs/

When the user already has a Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`, or
`~/.cache/huggingface/hub` exists), hub models go there instead and are shared
with every other HF tool: a model downloaded by `hf download` or mlx-lm is in
the store without a second copy.

Names: a hub model is named by its repo id (`mlx-community/Qwen3-0.6B-4bit`),
with `@REVISION` when it is not the default branch, or `@COMMIT` for a snapshot
no branch points to; never by its commit hash alone. A directory is named by
its directory name, except a snapshot inside an HF cache, which is named by its
repo id.

Only what mlx-lm can load is listed: a config.json with a model type mlx-lm
knows, and safetensors weights. A snapshot that holds only some weight files (a
node of a cluster fetches only those its layers need) is listed as partial.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_trio.hub_plan import DEFAULT_REVISION, INDEX_FILE, HubRef, weight_files

log = logging.getLogger(__name__)

HUB_DIR = "hub"
_CACHE_REPO = "models--"
_MODEL_TYPE = re.compile(r"[A-Za-z0-9_]+")


def hub_cache_dir(data_dir: Path) -> Path:
    """Where hub models go: the user's Hugging Face cache if they have one (or name
    one with HF_HUB_CACHE / HF_HOME), else the node's own store."""
    from huggingface_hub import constants

    standard = Path(constants.HF_HUB_CACHE)
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or standard.is_dir():
        return standard
    return data_dir / "models" / HUB_DIR


def mlx_supports(model_type: str) -> bool:
    """Whether mlx-lm has a model class for this config.json model_type."""
    if not _MODEL_TYPE.fullmatch(model_type):
        return False
    from mlx_lm.utils import MODEL_REMAPPING

    module = MODEL_REMAPPING.get(model_type, model_type)
    try:
        return importlib.util.find_spec(f"mlx_lm.models.{module}") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path  # the directory mlx-lm loads
    repo: str | None  # hub repo id; None for a plain directory
    commit: str | None
    size_bytes: int  # weights on disk
    complete: bool  # every weight file is here
    modified: float  # when it was last written (seconds since the epoch)
    architecture: str

    @property
    def ref(self) -> HubRef | None:
        if self.repo is None:
            return None
        revision = self.name.partition("@")[2] or DEFAULT_REVISION
        return HubRef(self.repo, revision)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def describe(path: Path, name: str, repo: str | None, commit: str | None) -> StoredModel | None:
    """The store entry for a model directory, or None if mlx-lm could not load it."""
    config = _read_json(path / "config.json")
    if config is None or not mlx_supports(str(config.get("model_type", ""))):
        return None
    present = weight_files(p.name for p in path.iterdir() if p.is_file())
    if not present:
        return None
    sizes = [(path / f).stat() for f in present]
    return StoredModel(
        name=name,
        path=path,
        repo=repo,
        commit=commit,
        size_bytes=sum(s.st_size for s in sizes),
        complete=has_all_weights(path),
        modified=max(s.st_mtime for s in sizes),
        architecture=str(config.get("model_type", "")),
    )


def has_all_weights(path: Path) -> bool:
    """Every weight file of the model is in the directory (its index's files, or,
    without an index, at least one model*.safetensors)."""
    present = set(weight_files(p.name for p in path.iterdir() if p.is_file()))
    index = _read_json(path / INDEX_FILE)
    if index is not None and isinstance(index.get("weight_map"), dict):
        return {str(f) for f in index["weight_map"].values()} <= present
    return bool(present)


def cache_repo_id(folder_name: str) -> str | None:
    """`models--ORG--NAME` -> `ORG/NAME` (the HF cache's folder naming)."""
    if not folder_name.startswith(_CACHE_REPO):
        return None
    parts = folder_name[len(_CACHE_REPO) :].split("--")
    return "/".join(parts) if all(parts) else None


def name_for_path(path: Path) -> str:
    """The name a model directory given by path is served under: its repo id if it
    is a snapshot in a Hugging Face cache, else the directory's name."""
    path = path.resolve()
    if path.parent.name == "snapshots":
        repo = cache_repo_id(path.parent.parent.name)
        if repo is not None:
            return repo
    return path.name


class ModelStore:
    def __init__(self, data_dir: Path, hub_cache: Path | None = None) -> None:
        self.root = data_dir / "models"
        self.hub_cache = hub_cache if hub_cache is not None else hub_cache_dir(data_dir)

    def models(self) -> list[StoredModel]:
        found: dict[str, StoredModel] = {}
        for model in [*self._hub_models(), *self._local_models()]:
            found.setdefault(model.name, model)
        return sorted(found.values(), key=lambda m: m.name)

    def find(self, name: str) -> StoredModel | None:
        name = name.removesuffix(":latest")
        return next((m for m in self.models() if m.name == name), None)

    def delete(self, model: StoredModel) -> None:
        """Remove a model's files (for a hub model: its snapshot, the refs naming it
        and the blobs no other snapshot uses, with huggingface_hub's own cache
        cleaner)."""
        if model.repo is None:
            shutil.rmtree(model.path)
            return
        from huggingface_hub import scan_cache_dir

        assert model.commit is not None
        cache = scan_cache_dir(self.hub_cache)
        cache.delete_revisions(model.commit).execute()
        log.info("deleted %s (%s) from %s", model.name, model.commit, self.hub_cache)

    def _local_models(self) -> list[StoredModel]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or path.name == HUB_DIR or not path.is_dir():
                continue
            model = describe(path, path.name, None, None)
            if model is not None:
                found.append(model)
        return found

    def _hub_models(self) -> list[StoredModel]:
        if not self.hub_cache.is_dir():
            return []
        found = []
        for folder in sorted(self.hub_cache.iterdir()):
            repo = cache_repo_id(folder.name)
            snapshots = folder / "snapshots"
            if repo is None or not snapshots.is_dir():
                continue
            named: dict[str, str] = {}  # commit -> name
            refs = folder / "refs"
            for ref in sorted(refs.rglob("*")) if refs.is_dir() else ():
                if not ref.is_file():
                    continue
                revision = ref.relative_to(refs).as_posix()
                commit = ref.read_text().strip()
                name = HubRef(repo, revision).name
                # The default branch's name wins over another ref to the same commit.
                if commit not in named or revision == DEFAULT_REVISION:
                    named[commit] = name
            for snapshot in sorted(snapshots.iterdir()):
                name = named.get(snapshot.name, f"{repo}@{snapshot.name}")
                model = describe(snapshot, name, repo, snapshot.name)
                if model is not None:
                    found.append(model)
        return found
