"""Tests for the offline demo checkpoint (exo_trio.demo_model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from exo_trio.demo_model import (
    DEMO_CONFIG,
    DEMO_MODEL_ID,
    EOS_TOKEN_ID,
    IM_END_TOKEN_ID,
    build_demo_model,
    ensure_demo_model,
)

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model_dir(demo_model_dir: Path) -> Path:
    # conftest.py builds the demo once per session with build_demo_model.
    return demo_model_dir


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[nn.Module, TokenizerWrapper]:
    model, tokenizer = mlx_lm.load(str(model_dir))
    return model, tokenizer


def test_files_and_config(model_dir: Path) -> None:
    assert EXPECTED_FILES <= {p.name for p in model_dir.iterdir()}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is False
    # Tensor parallel over two ranks needs both head counts to split evenly.
    assert config["num_attention_heads"] % 2 == 0
    assert config["num_key_value_heads"] % 2 == 0
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "chat_template" in tok_cfg


def test_weights_match_mlx_lm_llama(model_dir: Path) -> None:
    reference = Model(ModelArgs.from_dict(DEMO_CONFIG))
    expected = {k: tuple(v.shape) for k, v in tree_flatten(reference.parameters())}
    saved = mx.load(str(model_dir / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(v.dtype == mx.float32 for v in saved.values())
    n_params = sum(v.size for v in saved.values())
    assert 3_000_000 < n_params < 10_000_000


def test_mlx_lm_loads_model_and_tokenizer(loaded: tuple[nn.Module, TokenizerWrapper]) -> None:
    model, tokenizer = loaded
    assert isinstance(model, Model)
    # config.json/generation_config.json's EOS ids reach mlx-lm's stop set.
    assert {IM_END_TOKEN_ID, EOS_TOKEN_ID} <= set(tokenizer.eos_token_ids)
    assert tokenizer.eos_token_id == IM_END_TOKEN_ID
    assert tokenizer.vocab_size == DEMO_CONFIG["vocab_size"]
    # A ByteLevel decoder makes mlx-lm choose its BPE streaming detokenizer.
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    text = "Hello, wörld! 🎉 def f(x): return x"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_build_is_byte_identical(model_dir: Path, tmp_path: Path) -> None:
    second = build_demo_model(tmp_path / "again")
    first_hashes = _hashes(model_dir)
    assert set(first_hashes) == EXPECTED_FILES
    assert _hashes(second) == first_hashes


def test_chat_template_renders(loaded: tuple[nn.Module, TokenizerWrapper]) -> None:
    _, tokenizer = loaded
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hi "},
                {"type": "image_url", "image_url": {"url": "ignored"}},
                {"type": "text", "text": "there"},
            ],
        },
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids.count(IM_END_TOKEN_ID) == 2
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt.endswith("there<|im_end|>\n")


def test_greedy_decoding_does_not_collapse(
    loaded: tuple[nn.Module, TokenizerWrapper],
) -> None:
    model, tokenizer = loaded
    banned = sorted(tokenizer.eos_token_ids)

    def ban_eos(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[:, banned] = -float("inf")
        return logits

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello! Can you tell me a short story about a dragon?"}],
        add_generation_prompt=True,
    )
    tokens = [
        r.token
        for r in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=48,
            sampler=make_sampler(temp=0.0),
            logits_processors=[ban_eos],
        )
    ]
    assert len(tokens) == 48
    assert not set(tokens) & set(banned)
    assert len(set(tokens)) >= 25, tokens


def test_ensure_demo_model_builds_once(tmp_path: Path, model_dir: Path) -> None:
    path = ensure_demo_model(tmp_path)
    assert path == tmp_path / "models" / DEMO_MODEL_ID
    assert _hashes(path).items() >= _hashes(model_dir).items()
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_demo_model(tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime
    # No temporary build directories are left beside the model.
    assert [p.name for p in (tmp_path / "models").iterdir()] == [DEMO_MODEL_ID]


def test_ensure_demo_model_replaces_incomplete_dir(tmp_path: Path) -> None:
    target = tmp_path / "models" / DEMO_MODEL_ID
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no completion marker
    assert ensure_demo_model(tmp_path) == target
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
