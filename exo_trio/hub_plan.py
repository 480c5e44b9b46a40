"""Hub models: what a name means, whether a repo can run here, which of its files to
fetch. Pure decisions on the repo's listing and small files; the downloading is in
hub_download.py.

A hub model is named `org/name` or `org/name@revision` (a branch, tag or commit).
It is served under that name: the revision shows only when it is not the default
branch, so `mlx-community/Qwen3-0.6B-4bit` is served as exactly that.

What is fetched: the small files every node needs to tokenize and to understand
the model (config, tokenizer, chat template, the weight index), then the weight
files. mlx-lm loads `model*.safetensors` and nothing else, so those are the
weights; PyTorch `.bin`, GGUF, ONNX and `original/` copies are never fetched. A
model whose weights are split into several files with an index
(`model.safetensors.index.json`) can be fetched in part: a node holding layers
[start, end) of a pipeline needs only the files holding those layers' tensors and
the files holding tensors outside any layer (embeddings, final norm, head: every
rank computes the logits). A single-file model is fetched whole.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_REVISION = "main"
INDEX_FILE = "model.safetensors.index.json"

# The hub's own rule for repo ids: a namespace and a name of letters, digits and
# `-_.`, neither starting with `-` or `.` (huggingface_hub validate_repo_id).
_REPO_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}"
_HUB_REF = re.compile(rf"(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9._/-]+))?")

# Small files a node needs to tokenize, template and describe the model. Top level
# only: subfolders hold other formats (original/, onnx/) or other components.
SMALL_FILE_PATTERNS = (
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "vocab.json",
)
WEIGHT_PATTERN = "model*.safetensors"
# A tensor of decoder layer N: `model.layers.N.…`, `language_model.model.layers.N.…`.
_LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class HubError(Exception):
    """A hub model that cannot be fetched or run here; the message says why, and
    `status` is the HTTP status an API answers it with: 400 (the model cannot run
    here), 404 (no such model or revision), 403 (gated), 503 (the hub is out of
    reach), 502 (the hub or the download failed)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str = DEFAULT_REVISION

    @property
    def name(self) -> str:
        """The name the model is served under."""
        return self.repo if self.revision == DEFAULT_REVISION else f"{self.repo}@{self.revision}"


def parse_hub_ref(text: str) -> HubRef | None:
    """`org/name[@revision]` (an Ollama-style `:latest` tag is ignored), or None if
    `text` is not shaped like a hub id."""
    text = text.removesuffix(":latest")
    match = _HUB_REF.fullmatch(text)
    if match is None or ".." in text or text.endswith((".", "/")):
        return None
    return HubRef(match["repo"], match["revision"] or DEFAULT_REVISION)


@dataclass(frozen=True)
class RepoListing:
    """A repo at one commit: its files and their sizes (from the hub's model info)."""

    repo: str
    commit: str
    files: Mapping[str, int]  # path in the repo -> size in bytes


def is_small_file(path: str) -> bool:
    return "/" not in path and any(fnmatch.fnmatch(path, p) for p in SMALL_FILE_PATTERNS)


def weight_files(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if "/" not in f and fnmatch.fnmatch(f, WEIGHT_PATTERN))


def small_files(listing: RepoListing) -> list[str]:
    return sorted(f for f in listing.files if is_small_file(f))


def weights_size(listing: RepoListing) -> int:
    return sum(listing.files[f] for f in weight_files(listing.files))


def unloadable_reason(
    listing: RepoListing, config: Mapping[str, Any] | None, supported: Callable[[str], bool]
) -> str | None:
    """Why mlx-lm could not load this repo (None if it can), judged from its file
    listing and config.json alone, before any weight is downloaded."""
    name = listing.repo
    if config is None:
        return f"{name} has no config.json: it is not a transformers / MLX model repo"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return f"{name}'s config.json has no model_type: mlx-lm cannot tell which model it is"
    if config.get("model_file"):
        return (
            f"{name} needs custom model code ({config['model_file']}), which exo-trio does not run"
        )
    if not supported(model_type):
        return f"{name} is a {model_type!r} model, which mlx-lm does not support"
    if not weight_files(listing.files):
        others = sorted(
            {
                kind
                for path in listing.files
                for suffix, kind in (
                    (".gguf", "GGUF"),
                    (".bin", "PyTorch .bin"),
                    (".pth", "PyTorch .pth"),
                    (".onnx", "ONNX"),
                    (".safetensors", "safetensors not named model*.safetensors"),
                )
                if path.endswith(suffix)
            }
        )
        found = f" (it has {', '.join(others)} weights)" if others else ""
        return (
            f"{name} has no model*.safetensors weights{found}: exo-trio runs MLX-loadable "
            "safetensors models; look for an mlx-community conversion"
        )
    return None


def tensor_layer(tensor: str) -> int | None:
    match = _LAYER_TENSOR.search(tensor)
    return int(match.group(1)) if match else None


def files_for_layers(weight_map: Mapping[str, str], start: int, end: int) -> set[str]:
    """The weight files a rank holding layers [start, end) needs: those with a tensor
    of one of its layers, and those with any tensor outside the layers."""
    needed = set()
    for tensor, path in weight_map.items():
        layer = tensor_layer(tensor)
        if layer is None or start <= layer < end:
            needed.add(path)
    return needed


def plan_weights(
    listing: RepoListing,
    index: Mapping[str, Any] | None,
    layers: tuple[int, int] | None,
) -> list[str]:
    """The weight files to fetch: all of them, or with `layers` = (start, end) and an
    index to go by, only those the layers need."""
    weights = weight_files(listing.files)
    if layers is None or index is None:
        return weights
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        return weights
    needed = files_for_layers({str(k): str(v) for k, v in weight_map.items()}, *layers)
    if not needed <= set(weights):
        # The index names files the repo does not have as model*.safetensors: do not
        # guess, fetch everything (mlx-lm will then say what is wrong).
        return weights
    return sorted(needed)
