"""Facts about a model directory the API needs without loading the model: the
vocabulary size (to refuse out-of-range token ids before dispatch) and, for
catalogue endpoints (Ollama's /api/tags and /api/show), the architecture, size
on disk and a digest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from exo_trio.cluster_messages import ModelInfo
from exo_trio.prompts import context_length


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    size_bytes: int
    digest: str
    vocab_size: int  # 0 if the config does not say


def describe_model_dir(path: Path) -> ModelFacts:
    config_bytes = (path / "config.json").read_bytes()
    config = json.loads(config_bytes)
    architecture = str(config.get("model_type", ""))
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    weights = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    # A digest of the config and the weight files' names and sizes: it changes
    # when the model does, without reading gigabytes of weights at start-up.
    h = hashlib.sha256(config_bytes)
    for f in weights:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    vocab_size = vocab if isinstance(vocab, int) and vocab > 0 else 0
    return ModelFacts(architecture, size, f"sha256:{h.hexdigest()}", vocab_size)


def model_info(
    path: Path,
    model_id: str,
    *,
    size_bytes: int | None = None,
    repo: str | None = None,
    commit: str | None = None,
) -> ModelInfo:
    """What the leader needs to place a model: its size and shape, from the
    directory alone (no weights are loaded). For a hub model whose directory holds
    only some (or none) of its weights, the caller gives the size and the repo and
    commit the other nodes fetch it from."""
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)

    def first(*keys: str, default: int = 0) -> int:
        for key in keys:
            value = text.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return default

    n_heads = first("num_attention_heads", "n_heads")
    return ModelInfo(
        id=model_id,
        size_bytes=describe_model_dir(path).size_bytes if size_bytes is None else size_bytes,
        n_layers=first("num_hidden_layers", "n_layers", "num_layers"),
        n_heads=n_heads,
        n_kv_heads=first("num_key_value_heads", "n_kv_heads", default=n_heads),
        supports_tensor=_supports_tensor(str(config.get("model_type", ""))),
        context_length=context_length(path),
        repo=repo,
        commit=commit,
    )


def _supports_tensor(model_type: str) -> bool:
    """Whether mlx-lm's model class for this type can `shard` (tensor parallel)."""
    import importlib

    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        return False
    return hasattr(getattr(module, "Model", None), "shard")
