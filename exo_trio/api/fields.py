"""Every request field of every dialect: honoured, accepted without effect, or refused.

No field a client sends is silently dropped. Each dialect's request struct
forbids unknown fields (a 400 naming the field, as OpenAI's and Anthropic's own
APIs answer), and declares every field its API defines; this table says what
each one does here. A refused field that is present (not null, false or empty)
is a 400 naming it. docs/api.md shows the same table, and tests/test_fields.py
walks the `openai` and `anthropic` packages' own typed request params and
checks that each field is in it and does what it says.
"""

from __future__ import annotations

from typing import Any, Literal

from exo_trio.api.errors import ApiError

__all__ = [
    "ANTHROPIC",
    "FIELDS",
    "OLLAMA_CHAT",
    "OLLAMA_GENERATE",
    "OLLAMA_OPTIONS",
    "OPENAI_CHAT",
    "OPENAI_COMPLETIONS",
    "RESPONSES",
    "refuse_present",
]

Status = Literal["honoured", "no effect", "refused"]
Table = dict[str, tuple[Status, str]]

_NO_STORE = "nothing is stored or logged per request"

OPENAI_CHAT: Table = {
    "model": ("honoured", ""),
    "messages": ("honoured", "text parts; tool calls and tool results go through the template"),
    "max_tokens": ("honoured", ""),
    "max_completion_tokens": ("honoured", ""),
    "temperature": ("honoured", ""),
    "top_p": ("honoured", ""),
    "seed": ("honoured", ""),
    "stop": ("honoured", "at most 4"),
    "logit_bias": ("honoured", ""),
    "logprobs": ("honoured", "from the distribution the sampler draws from"),
    "top_logprobs": ("honoured", "0-20"),
    "presence_penalty": ("honoured", "over the output tokens"),
    "frequency_penalty": ("honoured", "over the output tokens"),
    "response_format": ("honoured", "text, json_object, json_schema: a grammar"),
    "tools": ("honoured", "function tools, rendered by the chat template"),
    "tool_choice": ("honoured", "auto, none, required, a named function"),
    "parallel_tool_calls": ("honoured", "false: at most one call"),
    "functions": ("honoured", "as tools (deprecated by OpenAI)"),
    "function_call": ("honoured", "as tool_choice (deprecated by OpenAI)"),
    "reasoning_effort": ("honoured", "none: thinking off; other levels: on"),
    "stream": ("honoured", ""),
    "stream_options": ("honoured", "include_usage"),
    "n": ("honoured", "1 only; other values refused"),
    "user": ("no effect", _NO_STORE),
    "metadata": ("no effect", _NO_STORE),
    "store": ("no effect", "completions are not stored (store: true is accepted)"),
    "safety_identifier": ("no effect", _NO_STORE),
    "prompt_cache_key": ("no effect", "routing hint"),
    "prompt_cache_retention": ("no effect", "routing hint"),
    "prompt_cache_options": ("no effect", "routing hint"),
    "service_tier": ("no effect", "one tier"),
    "prediction": ("no effect", "a latency hint; the output is the same without it"),
    "modalities": ("honoured", '["text"] only; others refused'),
    "audio": ("refused", "text only"),
    "verbosity": ("refused", "no such control for these models"),
    "web_search_options": ("refused", "no web search"),
    "moderation": ("refused", "no moderation"),
    # Extensions (vLLM's names): exact lengths for tests and benchmarks.
    "ignore_eos": ("honoured", "extension"),
    "top_k": ("honoured", "extension"),
    "min_p": ("honoured", "extension"),
    "repetition_penalty": ("honoured", "extension: a sign-aware multiplier, as Ollama's"),
}

OPENAI_COMPLETIONS: Table = {
    "model": ("honoured", ""),
    "prompt": ("honoured", "one string or one list of token ids"),
    "max_tokens": ("honoured", "default 16"),
    "temperature": ("honoured", ""),
    "top_p": ("honoured", ""),
    "seed": ("honoured", ""),
    "stop": ("honoured", "at most 4"),
    "logit_bias": ("honoured", ""),
    "logprobs": ("honoured", "0-20"),
    "presence_penalty": ("honoured", "over the output tokens"),
    "frequency_penalty": ("honoured", "over the output tokens"),
    "echo": ("honoured", "text prompts"),
    "stream": ("honoured", ""),
    "stream_options": ("honoured", "include_usage"),
    "n": ("honoured", "1 only"),
    "best_of": ("honoured", "1 only"),
    "user": ("no effect", _NO_STORE),
    "suffix": ("refused", "no fill-in-the-middle"),
    "ignore_eos": ("honoured", "extension"),
    "top_k": ("honoured", "extension"),
    "min_p": ("honoured", "extension"),
    "repetition_penalty": ("honoured", "extension"),
}

RESPONSES: Table = {
    "model": ("honoured", ""),
    "input": ("honoured", "text, messages, function_call and function_call_output items"),
    "instructions": ("honoured", "a leading system message"),
    "max_output_tokens": ("honoured", ""),
    "temperature": ("honoured", ""),
    "top_p": ("honoured", ""),
    "top_logprobs": ("honoured", "0-20, on output_text parts"),
    "include": ("honoured", "message.output_text.logprobs; others refused"),
    "tools": ("honoured", "function tools"),
    "tool_choice": ("honoured", "auto, none, required, a named function"),
    "parallel_tool_calls": ("honoured", ""),
    "text": ("honoured", "format: text, json_object, json_schema; verbosity refused"),
    "reasoning": ("honoured", "effort none: thinking off; the thinking text is returned"),
    "stream": ("honoured", ""),
    "stream_options": ("no effect", "include_obfuscation: no obfuscation is sent"),
    "truncation": ("honoured", "disabled only: a prompt too long is a 400"),
    "store": ("no effect", "responses are not stored"),
    "metadata": ("no effect", "echoed back"),
    "user": ("no effect", _NO_STORE),
    "safety_identifier": ("no effect", _NO_STORE),
    "prompt_cache_key": ("no effect", "routing hint"),
    "prompt_cache_retention": ("no effect", "routing hint"),
    "prompt_cache_options": ("no effect", "routing hint"),
    "service_tier": ("no effect", "one tier"),
    "previous_response_id": ("refused", "stateless: send the whole conversation"),
    "conversation": ("refused", "stateless: send the whole conversation"),
    "prompt": ("refused", "no stored prompts"),
    "background": ("refused", "no background responses"),
    "background_options": ("refused", "no background responses"),
    "context_management": ("refused", "no server-side context management"),
    "max_tool_calls": ("refused", "use parallel_tool_calls"),
    "moderation": ("refused", "no moderation"),
    "image": ("refused", "text only"),
    "access_programs": ("refused", "no hosted tools"),
    "logit_bias": ("honoured", "extension"),
    "ignore_eos": ("honoured", "extension"),
    "seed": ("honoured", "extension"),
    "top_k": ("honoured", "extension"),
}

ANTHROPIC: Table = {
    "model": ("honoured", ""),
    "messages": ("honoured", "text, tool_use, tool_result and thinking blocks"),
    "system": ("honoured", ""),
    "max_tokens": ("honoured", ""),
    "stop_sequences": ("honoured", ""),
    "temperature": ("honoured", "0-1"),
    "top_p": ("honoured", ""),
    "top_k": ("honoured", ""),
    "stream": ("honoured", ""),
    "tools": ("honoured", "custom tools; server tools refused"),
    "tool_choice": ("honoured", "auto, any, tool, none; disable_parallel_tool_use"),
    "thinking": ("honoured", "enabled (budget_tokens), adaptive, disabled"),
    "output_config": ("honoured", "format json_schema: a grammar; effort refused"),
    "metadata": ("no effect", _NO_STORE),
    "service_tier": ("no effect", "one tier"),
    "cache_control": ("no effect", "no prompt cache pricing"),
    "inference_geo": ("no effect", "one place"),
    "speed": ("no effect", "one speed"),
    "user_profile_id": ("no effect", _NO_STORE),
    "workspace_id": ("no effect", _NO_STORE),
    "container": ("refused", "no code execution"),
    "diagnostics": ("refused", "no diagnostics"),
    "mcp_servers": ("refused", "no MCP connector"),
    "context_management": ("refused", "no server-side context management"),
    "logit_bias": ("honoured", "extension"),
    "ignore_eos": ("honoured", "extension"),
    "seed": ("honoured", "extension"),
}

OLLAMA_CHAT: Table = {
    "model": ("honoured", "with or without :latest"),
    "messages": ("honoured", "content, tool_calls, tool results, thinking; images refused"),
    "tools": ("honoured", ""),
    "format": ("honoured", '"json" or a JSON schema: a grammar'),
    "options": ("honoured", "see the options table"),
    "stream": ("honoured", ""),
    "think": ("honoured", "false: thinking off; true or a level: on"),
    "logprobs": ("honoured", ""),
    "top_logprobs": ("honoured", "0-20"),
    "keep_alive": ("honoured", "0 with nothing to generate unloads the model; else it stays"),
}

OLLAMA_GENERATE: Table = {
    "model": ("honoured", "with or without :latest"),
    "prompt": ("honoured", ""),
    "system": ("honoured", ""),
    "raw": ("honoured", ""),
    "format": ("honoured", '"json" or a JSON schema: a grammar'),
    "options": ("honoured", "see the options table"),
    "stream": ("honoured", ""),
    "think": ("honoured", "false: thinking off; true or a level: on"),
    "logprobs": ("honoured", ""),
    "top_logprobs": ("honoured", "0-20"),
    "keep_alive": ("honoured", "0 with nothing to generate unloads the model; else it stays"),
    "suffix": ("refused", "no fill-in-the-middle"),
    "template": ("refused", "the model's own template is used"),
    "context": ("refused", "send the conversation (or the text) instead"),
    "images": ("refused", "text only"),
    "width": ("refused", "no image generation"),
    "height": ("refused", "no image generation"),
    "steps": ("refused", "no image generation"),
}

OLLAMA_OPTIONS: Table = {
    "num_predict": ("honoured", "-1 and -2: until the context is full"),
    "temperature": ("honoured", ""),
    "top_p": ("honoured", ""),
    "top_k": ("honoured", ""),
    "min_p": ("honoured", ""),
    "seed": ("honoured", ""),
    "stop": ("honoured", ""),
    "repeat_penalty": ("honoured", "default 1 (off); Ollama's own engine applies none either"),
    "repeat_last_n": ("honoured", "default 64; -1: the whole context; 0: off"),
    "presence_penalty": ("honoured", "over the output tokens"),
    "frequency_penalty": ("honoured", "over the output tokens"),
    "num_ctx": ("no effect", "the model's context length is used"),
    "num_batch": ("no effect", "performance"),
    "num_gpu": ("no effect", "performance"),
    "main_gpu": ("no effect", "performance"),
    "use_mmap": ("no effect", "performance"),
    "num_thread": ("no effect", "performance"),
    "num_keep": ("no effect", "the context is never shifted"),
    "numa": ("no effect", "performance"),
    "low_vram": ("no effect", "performance"),
    "use_mlock": ("no effect", "performance"),
    "f16_kv": ("no effect", "performance"),
    "vocab_only": ("no effect", "loading"),
    "embedding_only": ("no effect", "loading"),
    "logits_all": ("no effect", "logprobs are asked for with logprobs"),
    "typical_p": ("refused", "no typical sampling"),
    "tfs_z": ("refused", "no tail-free sampling"),
    "mirostat": ("refused", "0 only"),
    "mirostat_tau": ("refused", "no mirostat"),
    "mirostat_eta": ("refused", "no mirostat"),
    "penalize_newline": ("refused", "no newline penalty"),
    "logit_bias": ("honoured", "extension"),
    "ignore_eos": ("honoured", "extension"),
    "tool_choice": ("honoured", "extension: auto, none, required or a function name"),
    "parallel_tool_calls": ("honoured", "extension"),
}

FIELDS: dict[str, Table] = {
    "POST /v1/chat/completions": OPENAI_CHAT,
    "POST /v1/completions": OPENAI_COMPLETIONS,
    "POST /v1/responses": RESPONSES,
    "POST /v1/messages": ANTHROPIC,
    "POST /api/chat": OLLAMA_CHAT,
    "POST /api/generate": OLLAMA_GENERATE,
    "options (Ollama)": OLLAMA_OPTIONS,
}


def _present(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != {}


def refuse_present(body: Any, table: Table, prefix: str = "") -> None:
    """400 for the first refused field of `table` that `body` carries."""
    for name, (status, note) in table.items():
        if status == "refused" and _present(getattr(body, name, None)):
            where = prefix + name
            raise ApiError(400, f"`{where}` is not supported by this server: {note}.", param=where)
