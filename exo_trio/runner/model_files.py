"""Loading a model directory that may hold only some of the model's weight files.

A node holding layers [start, end) of a pipeline fetches only the weight files
those layers need, plus those with tensors outside the layers (docs/models.md).
mlx-lm's `load` insists on every weight (strict), so such a directory is loaded
the way mlx-lm's own `sharded_load` loads a pipeline stage's share: `load_model`
with `strict=False`, the model then cut down to the local layers
(layer_split.apply_sharding) so the missing layers are never read. What makes
that safe is checked first: every file the rank's layers need is there
(`missing_files`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exo_trio.hub_plan import INDEX_FILE, files_for_layers


def weight_map(model_path: Path) -> dict[str, str] | None:
    try:
        index = json.loads((model_path / INDEX_FILE).read_text())
    except FileNotFoundError:
        return None
    mapping = index.get("weight_map") if isinstance(index, dict) else None
    return {str(k): str(v) for k, v in mapping.items()} if isinstance(mapping, dict) else None


def missing_files(model_path: Path, layers: tuple[int, int] | None) -> list[str]:
    """The weight files the given layers (None: all) need that the directory lacks."""
    mapping = weight_map(model_path)
    if mapping is None:
        return []  # one file, or no index: mlx-lm says what is wrong
    needed = set(mapping.values()) if layers is None else files_for_layers(mapping, *layers)
    return sorted(f for f in needed if not (model_path / f).is_file())


def load_lazily(model_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, config) with the weights not yet read, as
    `mlx_lm.load(lazy=True)` gives them; a directory missing weight files is loaded
    without strict checks (see the module docstring)."""
    if not missing_files(model_path, None):
        from mlx_lm import load

        return load(str(model_path), lazy=True, return_config=True)  # type: ignore[return-value]
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(model_path, lazy=True, strict=False)
    tokenizer = load_tokenizer(model_path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config
