"""A tiny, fully offline, deterministic demo model for exo_trio.

``build_demo_model`` writes a small llama-architecture checkpoint (about 4M
float32 parameters) plus a byte-level BPE tokenizer into a directory that
``mlx_lm.load`` reads like any Hugging Face checkpoint. Nothing is downloaded:

* the weights are random, drawn from a fixed numpy seed, and written with a
  hand-rolled safetensors writer so the file is byte-identical on every run;
* the tokenizer is trained in a second or so with the Hugging Face
  ``tokenizers`` library on source files that ship with the Python standard
  library (a fixed list, so machines with the same Python version produce the
  same tokenizer).

The model talks nonsense, but it is a real llama with GQA attention, RoPE, a
SwiGLU MLP and untied embeddings, and its projections are scaled so greedy
decoding wanders over many different tokens instead of repeating one. That is
enough to exercise the whole serving stack (chat templates, streaming
detokenisation, KV caches, pipeline and tensor parallel sharding) in tests
and demos without network access.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEMO_CONFIG",
    "DEMO_FORMAT",
    "DEMO_MODEL_ID",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "SPECIAL_TOKENS",
    "build_demo_model",
    "ensure_demo_model",
]

DEMO_MODEL_ID = "demo"

# Special tokens are added first, so their ids are stable and small: 0..3, then
# the markers of thinking and tool calls, 4..9, as Qwen2.5/Qwen3 checkpoints have
# them: added tokens that are not "special" (they decode as text, and mlx-lm's
# tokenizer wrapper finds them: thinking by the <think> pair in the vocabulary,
# the tool-call format "json_tools" by the chat template below).
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
THINK_START_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"
TOOL_CALL_START_TOKEN = "<tool_call>"
TOOL_CALL_END_TOKEN = "</tool_call>"
TOOL_RESPONSE_START_TOKEN = "<tool_response>"
TOOL_RESPONSE_END_TOKEN = "</tool_response>"
CONTROL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
MARKER_TOKENS: tuple[str, ...] = (
    THINK_START_TOKEN,
    THINK_END_TOKEN,
    TOOL_CALL_START_TOKEN,
    TOOL_CALL_END_TOKEN,
    TOOL_RESPONSE_START_TOKEN,
    TOOL_RESPONSE_END_TOKEN,
)
SPECIAL_TOKENS: tuple[str, ...] = CONTROL_TOKENS + MARKER_TOKENS
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1
IM_START_TOKEN_ID = 2
IM_END_TOKEN_ID = 3
THINK_START_TOKEN_ID = 4
THINK_END_TOKEN_ID = 5
TOOL_CALL_START_TOKEN_ID = 6
TOOL_CALL_END_TOKEN_ID = 7
# Written into the built directory's completion marker: a data dir holding a demo
# model of an older layout (other tokens, another template) is rebuilt.
DEMO_FORMAT = "2"

VOCAB_SIZE = 2048

# Heads (4) and KV heads (2) are both divisible by 2 so the model can be split
# for tensor parallelism over two ranks; GQA (kv < heads) keeps the KV-head
# sharding path honest. intermediate_size is divisible by 2 as well.
DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 768,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": BOS_TOKEN_ID,
    # A chat turn ends with <|im_end|>, so that is the primary stop token (the
    # same convention as Qwen2 instruct checkpoints); generation_config.json
    # lists <|end_of_text|> too.
    "eos_token_id": IM_END_TOKEN_ID,
}

# A bigger model of the same layout, for benchmarks: ~94M parameters (376 MB of
# float32), so that a decode step costs what a small real model's does on a CPU
# (tens of milliseconds) rather than the demo's two; per-token overheads then
# weigh what they would in real use. Same tokenizer, same seed, same scaling.
MEDIUM_CONFIG: dict[str, Any] = {
    **DEMO_CONFIG,
    "hidden_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 2816,
}
SIZES: dict[str, dict[str, Any]] = {"demo": DEMO_CONFIG, "medium": MEDIUM_CONFIG}

# ChatML, with tools and thinking the way Qwen3's template does them, trimmed.
# Content may be a plain string or an OpenAI-style list of parts, of which only
# the "text" parts are rendered (this model has no other modality). With `tools`
# the system turn lists their signatures; an assistant's `tool_calls` (OpenAI
# shape: a `function` with `name` and `arguments`, a dict or a JSON string) are
# rendered as <tool_call> blocks; `tool` messages as <tool_response> blocks in a
# user turn. `enable_thinking=false` closes an empty thinking block after the
# generation prompt, as Qwen3 does; otherwise the model may open one itself.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- text(messages[0]['content']) + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each call, return a JSON object with the function name and"
    " arguments within <tool_call></tool_call> tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'system' and tools and loop.first -%}"
    "{%- elif role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{- '<|im_start|>user' -}}"
    "{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + text(message['content']) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + role + '\\n' + text(message['content']) -}}"
    "{%- if role == 'assistant' and message['tool_calls'] -%}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call -%}"
    "{%- if not loop.first or message['content'] -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}"
    "{%- if call['arguments'] is string -%}{{- call['arguments'] -}}"
    "{%- else -%}{{- call['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Multiplier on the 1/sqrt(fan_in) std of every projection matrix. Random
# weights at the "textbook" scale make the residual stream nearly constant
# across positions, and greedy decoding then collapses into one repeated
# token; a larger gain makes the output depend on the context enough to keep
# wandering (measured: >= 25 distinct tokens in 48 greedy steps).
_PROJECTION_GAIN = 2.0
_SEED = 0

# Stdlib files used as tokenizer training text, relative to the stdlib dir.
# pydoc_data/topics.py is ~750 KB of English prose (the language reference),
# the rest is ordinary Python source. Fixed list => same tokenizer on every
# machine with the same Python version; missing files are skipped.
_TRAINING_FILES: tuple[str, ...] = (
    "pydoc_data/topics.py",
    "textwrap.py",
    "argparse.py",
    "difflib.py",
    "calendar.py",
    "heapq.py",
    "functools.py",
    "dataclasses.py",
    "random.py",
    "statistics.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "email/message.py",
)

# Used only if none of the stdlib files can be read (e.g. a stripped-down
# embedded Python): training still works, the vocab is just less useful.
_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? "
    "I am a tiny demo model running on exo_trio.\n"
    "def main():\n    return 0\n"
)

_COMPLETE_MARKER = ".complete"


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _training_text() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for rel in _TRAINING_FILES:
        try:
            data = (stdlib / rel).read_bytes()
        except OSError:
            continue
        # Normalise line endings so a checkout with CRLF gives the same vocab.
        texts.append(data.decode("utf-8", errors="replace").replace("\r\n", "\n"))
    if not texts:
        texts.append(_FALLBACK_TEXT)
    return texts


def _train_tokenizer_json() -> str:
    """Train the byte-level BPE and return its tokenizer.json text."""
    # Imported lazily: only building (not using) the demo needs the trainer.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # GPT-2 style byte level: every byte is in the alphabet, so any text
    # round-trips without <unk>, and mlx-lm picks its BPEStreamingDetokenizer
    # because the decoder type is "ByteLevel".
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        # The corpus is large enough to fill the vocab; if a stripped-down
        # stdlib is not, fail loudly rather than write a config that lies.
        raise RuntimeError(
            f"demo tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}"
        )
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id
    content = json.loads(tokenizer.to_str())
    # The trainer adds every token it is given as "special"; the markers are
    # ordinary added tokens, as in Qwen's checkpoints (grammar engines then treat
    # them as text, "<tool_call>", like the rest of a call).
    for added in content["added_tokens"]:
        if added["content"] in MARKER_TOKENS:
            added["special"] = False
    # Re-serialise with sorted keys so the file does not depend on dict
    # ordering inside the Rust library.
    return json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False)


def _tokenizer_config() -> dict[str, Any]:
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": tok in CONTROL_TOKENS,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        # The tokenizer-level EOS is <|im_end|> so anything that only looks at
        # tokenizer.eos_token_id (mlx-lm's TokenizerWrapper does) stops at the
        # end of an assistant turn.
        "eos_token": IM_END_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        # The tool-call format, declared (mlx-lm would also infer it from a
        # Qwen-style template): <tool_call>{"name": ..., "arguments": ...}</tool_call>.
        "tool_parser_type": "json_tools",
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }


def _generation_config() -> dict[str, Any]:
    return {
        "bos_token_id": BOS_TOKEN_ID,
        # mlx-lm's load_config lets this list override config.json's value.
        "eos_token_id": [IM_END_TOKEN_ID, EOS_TOKEN_ID],
        "pad_token_id": EOS_TOKEN_ID,
        "do_sample": False,
    }


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def _parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every parameter mlx-lm's llama model expects.

    Spelled out by hand (rather than instantiating mlx_lm's Model) so building
    needs no MLX at all; tests check it against mlx_lm.models.llama.Model.
    """
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    head_dim = int(config["head_dim"])
    q_dim = int(config["num_attention_heads"]) * head_dim
    kv_dim = int(config["num_key_value_heads"]) * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (hidden,),
                f"{p}.post_attention_layernorm.weight": (hidden,),
                f"{p}.self_attn.q_proj.weight": (q_dim, hidden),
                f"{p}.self_attn.k_proj.weight": (kv_dim, hidden),
                f"{p}.self_attn.v_proj.weight": (kv_dim, hidden),
                f"{p}.self_attn.o_proj.weight": (hidden, q_dim),
                f"{p}.mlp.gate_proj.weight": (inter, hidden),
                f"{p}.mlp.up_proj.weight": (inter, hidden),
                f"{p}.mlp.down_proj.weight": (hidden, inter),
            }
        )
    return dict(sorted(shapes.items()))


def _make_weights(config: dict[str, Any]) -> dict[str, np.ndarray]:
    # One generator, parameters drawn in sorted-name order: the values depend
    # only on the seed and the name list, never on dict or hash ordering.
    rng = np.random.default_rng(_SEED)
    weights: dict[str, np.ndarray] = {}
    for name, shape in _parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            arr = np.ones(shape, dtype=np.float32)
        elif name == "model.embed_tokens.weight":
            # Unit-variance embeddings (what nn.Embedding-style init gives
            # after RMSNorm anyway).
            arr = rng.standard_normal(shape, dtype=np.float32)
        else:
            fan_in = shape[1]
            std = _PROJECTION_GAIN / np.sqrt(fan_in)
            arr = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(
                np.float32
            )
        weights[name] = np.ascontiguousarray(arr, dtype="<f4")
    return weights


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Minimal deterministic safetensors writer (float32 only).

    Format: u64 little-endian header length, JSON header, raw tensor bytes.
    Keys are written in sorted order and the header is space-padded to an
    8-byte boundary, so identical inputs give identical bytes.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        arr = tensors[name]
        if arr.dtype != np.dtype("<f4"):
            raise TypeError(f"{name}: only float32 is supported, got {arr.dtype}")
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in names:
            f.write(tensors[name].tobytes(order="C"))


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_demo_model(out_dir: Path, size: str = "demo") -> Path:
    """Write the demo checkpoint into ``out_dir`` (created if needed); ``size``
    "medium" writes the bigger benchmark model (MEDIUM_CONFIG) instead.

    Produces config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json and special_tokens_map.json.
    The output is byte-identical on every run with the same Python version.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(SIZES[size])
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config())
    _write_safetensors(out_dir / "model.safetensors", _make_weights(config))
    (out_dir / "tokenizer.json").write_text(_train_tokenizer_json() + "\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    return out_dir


def _is_complete(path: Path) -> bool:
    """Built to the end, and in this version's layout (DEMO_FORMAT)."""
    try:
        marker = (path / _COMPLETE_MARKER).read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return marker == f"ok {DEMO_FORMAT}" and (path / "config.json").is_file()


def ensure_demo_model(data_dir: Path) -> Path:
    """Return ``data_dir/models/demo``, building it there if not already done.

    The build goes into a temporary sibling directory that is renamed into
    place only once every file is written, so a crash or a concurrent
    builder never leaves a half-written model at the final path.
    """
    models_dir = Path(data_dir) / "models"
    target = models_dir / DEMO_MODEL_ID
    if _is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_ID}-build-", dir=models_dir))
    try:
        build_demo_model(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"ok {DEMO_FORMAT}\n", encoding="utf-8")
        # mkdtemp creates the directory 0700; make the result readable like
        # any other model directory.
        tmp.chmod(0o755)
        if target.exists() and not _is_complete(target):
            # Leftover from an interrupted non-atomic copy or similar (the
            # marker is missing, so the contents cannot be trusted), or a demo
            # model of an older layout.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else renamed a complete build into place first.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
