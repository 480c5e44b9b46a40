"""The seed corpus: valid (and a few nearly valid) inputs for every target.

`python -m fuzz --write-seeds` writes them to fuzz/corpus/TARGET/seed-*. They are
where mutation starts, so they cover every route, the streaming and non-streaming
forms, every sampling field, and, for the link targets, complete handshakes in
both roles followed by data frames. Crash inputs found later sit next to them as
crash-* files and are replayed by tests/test_fuzz.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from fuzz.targets import TARGETS

EOS_BAN = {"1": -100, "3": -100}
# Tools, calls in the history and schemas (issue 15): each dialect's own shapes.
PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
FUNCTION = {"name": "get_weather", "description": "Weather.", "parameters": PARAMS}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def api_seed(route: int, body: dict[str, object], flags: int = 0, q: int = 0, ct: int = 0) -> bytes:
    return bytes([route, flags, q, ct]) + json.dumps(body).encode()


def chat_bodies() -> list[dict[str, object]]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    return [
        {"model": "demo", "messages": messages, "max_tokens": 5},
        {"model": "demo", "messages": messages, "max_tokens": 5, "stream": True},
        {
            "model": "demo",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_completion_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 5,
            "seed": 7,
            "stop": ["\n", "END"],
            "logit_bias": EOS_BAN,
            "ignore_eos": True,
            "n": 1,
            "user": "u",
        },
        {
            "model": "demo",
            "messages": [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}],
        },
        {
            "model": "demo",
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "x"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [{"type": "function", "function": FUNCTION}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 30,
            "stream": True,
        },
        {
            "model": "demo",
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": SCHEMA},
            },
            "logprobs": True,
            "top_logprobs": 2,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "reasoning_effort": "none",
            "max_tokens": 8,
        },
    ]


def api_seeds(name: str) -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    if name == "api_openai_chat":
        for i, body in enumerate(chat_bodies()):
            seeds[f"chat-{i}"] = api_seed(0, body)
        seeds["bench"] = api_seed(1, chat_bodies()[0])
    elif name == "api_completions":
        seeds["text"] = api_seed(0, {"model": "demo", "prompt": "Once upon", "max_tokens": 4})
        seeds["stream-echo"] = api_seed(
            0,
            {
                "model": "demo",
                "prompt": "abc",
                "echo": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 3,
            },
        )
        seeds["ids"] = api_seed(
            0,
            {
                "model": "demo",
                "prompt": [5, 6, 7],
                "max_tokens": 2,
                "logit_bias": EOS_BAN,
                "temperature": 0.5,
            },
        )
        seeds["list"] = api_seed(0, {"model": "demo", "prompt": ["one"], "stop": "x"})
        seeds["logprobs"] = api_seed(
            0, {"model": "demo", "prompt": "x", "logprobs": 3, "stream": True, "max_tokens": 3}
        )
    elif name == "api_responses":
        seeds["string"] = api_seed(0, {"model": "demo", "input": "hi", "max_output_tokens": 4})
        seeds["items-stream"] = api_seed(
            0,
            {
                "model": "demo",
                "instructions": "Be brief.",
                "input": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hello"}],
                    },
                    {"role": "assistant", "content": "ok"},
                ],
                "stream": True,
                "max_output_tokens": 6,
                "text": {"format": {"type": "text"}},
                "metadata": {"k": "v"},
                "store": False,
                "seed": 3,
            },
        )
        seeds["tools-stream"] = api_seed(
            0,
            {
                "model": "demo",
                "input": [
                    {"role": "user", "content": "weather?"},
                    {
                        "type": "function_call",
                        "call_id": "c1",
                        "name": "get_weather",
                        "arguments": '{"city": "x"}',
                    },
                    {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                ],
                "tools": [{"type": "function", **FUNCTION}],
                "tool_choice": {"type": "function", "name": "get_weather"},
                "stream": True,
                "max_output_tokens": 30,
            },
        )
        seeds["schema"] = api_seed(
            0,
            {
                "model": "demo",
                "input": "json",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}},
                "top_logprobs": 2,
                "include": ["message.output_text.logprobs"],
                "reasoning": {"effort": "none"},
                "max_output_tokens": 8,
            },
        )
    elif name == "api_anthropic":
        base = {"model": "demo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        seeds["messages"] = api_seed(0, base)
        seeds["stream"] = api_seed(
            0,
            {
                **base,
                "stream": True,
                "system": [{"type": "text", "text": "Be brief."}],
                "stop_sequences": ["\n"],
                "temperature": 0.5,
                "top_k": 3,
                "metadata": {"user_id": "x"},
                "logit_bias": EOS_BAN,
                "ignore_eos": True,
            },
        )
        seeds["blocks"] = api_seed(
            0,
            {
                **base,
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}]},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ],
            },
        )
        seeds["count"] = api_seed(1, {"model": "demo", "messages": base["messages"], "system": "s"})
        tool = {"name": "get_weather", "input_schema": PARAMS}
        seeds["tools-stream"] = api_seed(
            0,
            {
                **base,
                "max_tokens": 30,
                "stream": True,
                "tools": [tool],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hm", "signature": ""},
                            {
                                "type": "tool_use",
                                "id": "t1",
                                "name": "get_weather",
                                "input": {"city": "x"},
                            },
                        ],
                    },
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
                    },
                ],
            },
        )
        seeds["schema-thinking"] = api_seed(
            0,
            {
                **base,
                "max_tokens": 20,
                "thinking": {"type": "enabled", "budget_tokens": 4},
                "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
            },
        )
    elif name == "api_ollama":
        msgs = [{"role": "user", "content": "hi"}]
        opts = {
            "num_predict": 4,
            "temperature": 0,
            "seed": 1,
            "stop": ["\n"],
            "top_k": 3,
            "top_p": 0.5,
            "num_ctx": 2048,
            "logit_bias": EOS_BAN,
        }
        seeds["chat-stream"] = api_seed(
            0, {"model": "demo", "messages": msgs, "options": {"num_predict": 4}}
        )
        seeds["chat"] = api_seed(
            0,
            {
                "model": "demo:latest",
                "messages": msgs,
                "stream": False,
                "options": opts,
                "keep_alive": "5m",
            },
        )
        seeds["generate"] = api_seed(
            1, {"model": "demo", "prompt": "hi", "system": "s", "options": {"num_predict": 3}}
        )
        seeds["generate-raw"] = api_seed(
            3,
            {
                "model": "demo",
                "prompt": "raw text",
                "raw": True,
                "stream": False,
                "options": {"num_predict": -1},
            },
        )
        seeds["tools"] = api_seed(
            0,
            {
                "model": "demo",
                "messages": [
                    *msgs,
                    {
                        "role": "assistant",
                        "content": "",
                        "thinking": "hm",
                        "tool_calls": [
                            {"function": {"name": "get_weather", "arguments": {"city": "x"}}}
                        ],
                    },
                    {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
                ],
                "tools": [{"type": "function", "function": FUNCTION}],
                "options": {
                    "num_predict": 30,
                    "tool_choice": "required",
                    "parallel_tool_calls": False,
                    "repeat_penalty": 1.1,
                    "min_p": 0.1,
                },
                "think": False,
            },
        )
        seeds["format"] = api_seed(
            1,
            {
                "model": "demo",
                "prompt": "hi",
                "format": SCHEMA,
                "logprobs": True,
                "top_logprobs": 2,
                "stream": False,
                "options": {"num_predict": 8},
            },
        )
        seeds["load"] = api_seed(2, {"model": "demo"})
        seeds["show"] = api_seed(4, {"model": "demo", "verbose": True})
    elif name == "api_guard":
        for i in range(13):
            seeds[f"route-{i}"] = api_seed(
                i,
                {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
            )
        seeds["wrong-key"] = api_seed(0, {}, flags=0x20, ct=3)
        seeds["preflight"] = api_seed(9, {}, flags=0x84, q=6, ct=0x30)
        seeds["cors"] = api_seed(1, {}, flags=0x40)
    return seeds


def frame_seeds() -> dict[str, bytes]:
    from exo_trio.runner.framing import encode_frame
    from exo_trio.runner.protocol import (
        CancelAck,
        Loading,
        PromptCacheStats,
        Ready,
        RunnerError,
        Shutdown,
    )
    from exo_trio.types import (
        Cancel,
        ChunkGenerated,
        GenerationFailed,
        GenerationFinished,
        SamplingParams,
        TextGeneration,
    )

    runner_out = [
        Loading(fraction=0.5, phase="weights"),
        Ready(model="m", context_length=64, max_batch=4, pid=9, blas="libopenblas.so.0"),
        ChunkGenerated(request_id="r0", seq=0, token=5, text="a"),
        GenerationFinished(
            request_id="r0",
            chunks=1,
            finish_reason="length",
            prompt_tokens=2,
            completion_tokens=1,
            stop_sequence="\n",
            cached_tokens=1,
        ),
        PromptCacheStats(lookups=2, hits=1, tokens_reused=1, entries=1, bytes=64),
        GenerationFailed(request_id="r1", kind="internal", message="x"),
        CancelAck(request_id="r1", steps_after_cancel=1, known=True),
        RunnerError(message="boom"),
    ]
    worker_out = [
        TextGeneration(
            request_id="r0",
            model="m",
            prompt_tokens=[1, 2, 3],
            params=SamplingParams(max_tokens=4, stop=("x",), logit_bias={3: -1e9}, seed=1, top_k=2),
        ),
        Cancel(request_id="r0"),
        Shutdown(),
    ]
    return {
        "runner-out": bytes([0, 3]) + b"".join(encode_frame(m) for m in runner_out),
        "worker-out": bytes([1, 5]) + b"".join(encode_frame(m) for m in worker_out),
        "one-chunk": bytes([0, 0]) + encode_frame(runner_out[2]),
    }


def runner_stream_seeds() -> dict[str, bytes]:
    from exo_trio.runner.framing import encode_frame
    from exo_trio.runner.protocol import CancelAck, PromptCacheStats, RunnerError
    from exo_trio.types import ChunkGenerated, GenerationFailed, GenerationFinished

    def chunks(rid: str, n: int) -> list[object]:
        return [ChunkGenerated(request_id=rid, seq=i, token=i, text=f"{i} ") for i in range(n)]

    def done(rid: str, n: int) -> GenerationFinished:
        return GenerationFinished(
            request_id=rid, chunks=n, finish_reason="length", prompt_tokens=2, completion_tokens=n
        )

    scripts = {
        "both-finish": [*chunks("r0", 3), done("r0", 3), *chunks("r1", 2), done("r1", 2)],
        "interleaved": [
            *chunks("r1", 1),
            *chunks("r0", 1),
            done("r0", 1),
            GenerationFailed(request_id="r1", kind="invalid", message="no"),
        ],
        "ack-unknown": [
            CancelAck(request_id="zz", steps_after_cancel=0, known=False),
            *chunks("r0", 2),
        ],
        "runner-error": [*chunks("r0", 1), RunnerError(message="oom")],
        # A prefix cache report between a request's chunks (the worker keeps it aside).
        "cache-report": [*chunks("r0", 1), PromptCacheStats(hits=1, entries=1), done("r0", 1)],
    }
    return {
        name: bytes([7]) + b"".join(encode_frame(m) for m in messages)
        for name, messages in scripts.items()
    }


def link_seeds(name: str) -> dict[str, bytes]:
    import msgspec

    from exo_trio.cluster_messages import RemoteAck
    from exo_trio.net import wire
    from fuzz.link_targets import op

    hello_a = bytes([0, 1, 1, 1, 1, 1, 1, 1])  # "node-a": it decides, we wait for ACTIVATE
    hello_z = bytes([1, 1, 1, 1, 1, 1, 1, 1])  # "node-z": we decide
    # As dialer (our node accepts and decides): Hello, read ours, prove first, read
    # our proof, say READY (the protocol's KIND_READY, 3), read our ACTIVATE.
    dialer_handshake = (
        op(2, hello_z) + op(3, b"\0") + op(4, b"\0") + op(3, b"\0") + op(5, b"\x03") + op(3, b"\0")
    )
    # As the deciding dialer: after the proofs, send ACTIVATE (2).
    wait_handshake = op(2, hello_a) + op(3, b"\0") + op(4, b"\0") + op(3, b"\0") + op(5, b"\x02")
    # As acceptor facing our deciding dialer: read its Hello, answer, read its proof,
    # prove, read its ACTIVATE.
    acceptor_handshake = op(3, b"\0") + op(2, hello_z) + op(3, b"\0") + op(4, b"\0") + op(3, b"\0")
    # A message frame's body is a batch (wire.pack_batch), here of one message.
    message = wire.pack_batch([msgspec.msgpack.encode(RemoteAck(request_id="r", upto=1))])
    if name == "link_handshake":
        return {
            "dialer": bytes([0]) + dialer_handshake,
            "acceptor": bytes([1]) + acceptor_handshake,
            "waits-activate": bytes([0]) + wait_handshake,
            "bad-proof": bytes([0]) + op(2, hello_z) + op(3, b"\0") + op(4, b"\x01" + bytes(32)),
            "low-order-key": bytes([0]) + op(2, bytes([1, 1, 1, 1, 1 | 8, 1, 1, 1])),
            "wrong-cluster": bytes([0]) + op(2, bytes([1, 1, 0, 1, 1, 1, 1, 1]) + b"other"),
            "text": bytes([0]) + op(1, b"hello"),
            "wrong-resource": bytes([3]) + op(0, b"x"),
        }
    # As the deciding acceptor: after the proofs, wait for our READY, then ACTIVATE.
    acceptor_handshake_a = (
        op(3, b"\0") + op(2, hello_a) + op(3, b"\0") + op(4, b"\0") + op(3, b"\0") + op(5, b"\x02")
    )
    return {
        "acceptor-decides": bytes([1]) + acceptor_handshake_a + op(6, message) + op(3, b"\0"),
        "heartbeat": bytes([0]) + dialer_handshake + op(5, b"\x01") + op(8, b"\x05"),
        "message": bytes([0]) + dialer_handshake + op(6, message) + op(3, b"\0"),
        "after-activate": bytes([0]) + wait_handshake + op(6, message) + op(5, b"\x00" + message),
        "acceptor-message": bytes([1]) + acceptor_handshake + op(6, message) + op(9),
        "bad-kind": bytes([0]) + dialer_handshake + op(5, b"\x07junk"),
        "silence": bytes([0]) + dialer_handshake + op(8, b"\xff") + op(8, b"\xff"),
        "close": bytes([0]) + dialer_handshake + op(7, b"\x03bye"),
    }


def beacon_seeds() -> dict[str, bytes]:
    from exo_trio.net import wire
    from fuzz.link_targets import CLUSTER

    def body(**changes: object) -> bytes:
        fields: dict[str, object] = {
            "version": wire.PROTOCOL_VERSION,
            "cluster_id": CLUSTER,
            "node_id": "node-x",
            "incarnation": "i",
            "listen_port": 52416,
            "addresses": [wire.AdvertisedAddress("10.0.0.9", 52416, "en0", "private")],
        }
        fields.update(changes)
        return wire.encode_beacon_body(wire.Beacon(**fields))  # type: ignore[arg-type]

    return {
        "signed": bytes([3]) + body(),
        "signed-loopback": bytes([1]) + body(addresses=[wire.AdvertisedAddress("127.0.0.1", 1)]),
        "other-cluster": bytes([3]) + body(cluster_id="x"),
        "unsigned": bytes([0]) + wire.BEACON_MAGIC + bytes(32) + body(),
    }


def sse_seeds() -> dict[str, bytes]:
    text = "Hello\x00 world\x00\n\ndata: [DONE]\n\n\x00\u2028\x00\U0001f600\x00\r\x00: x"
    return {f"dialect-{d}-{f}": bytes([d, f]) + text.encode() for d in range(6) for f in (0, 7)}


def seeds_for(name: str) -> dict[str, bytes]:
    if name.startswith("api_"):
        return api_seeds(name)
    if name == "runner_frames":
        return frame_seeds()
    if name == "runner_stream":
        return runner_stream_seeds()
    if name.startswith("link_"):
        return link_seeds(name)
    if name == "beacons":
        return beacon_seeds()
    return sse_seeds()


def write_seeds() -> dict[str, int]:
    counts = {}
    for name, target in TARGETS.items():
        corpus: Path = target.corpus
        corpus.mkdir(parents=True, exist_ok=True)
        for old in corpus.glob("seed-*"):
            old.unlink()
        seeds = seeds_for(name)
        for seed_name, data in seeds.items():
            (corpus / f"seed-{seed_name}").write_bytes(data)
        counts[name] = len(seeds)
    return counts
