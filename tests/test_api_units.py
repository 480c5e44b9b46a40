"""Unit tests of the API's pure parts: error envelopes, parameter checks, the
node-side cancel in the streams registry, stop-sequence reporting, exposure."""

from __future__ import annotations

import pytest
import trio

from exo_trio.api.auth import check_exposure, is_loopback
from exo_trio.api.errors import ApiError, decode_body, dialect_for_path, render_error
from exo_trio.api.generation import Timing
from exo_trio.api.ollama import ChatRequest, OllamaOptions, ollama_params
from exo_trio.api.sampling import BAN, build_params
from exo_trio.api.settings import ApiSettings
from exo_trio.node import ModelCard
from exo_trio.runner.stop_strings import StopStringMatcher
from exo_trio.streams import StreamRegistry
from exo_trio.types import ChunkGenerated, GenerationFailed, GenerationFinished, SamplingParams


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/chat/completions", "openai"),
        ("/v1/responses", "openai"),
        ("/v1/messages", "anthropic"),
        ("/v1/messages/count_tokens", "anthropic"),
        ("/api/chat", "ollama"),
        ("/ollama/api/generate", "ollama"),
        ("/metrics", "openai"),
        ("/nowhere", "openai"),
    ],
)
def test_the_envelope_follows_the_path(path: str, dialect: str) -> None:
    assert dialect_for_path(path) == dialect


def test_error_envelopes_of_each_dialect() -> None:
    error = ApiError(400, "Bad value.", param="messages[0].content")
    assert render_error(error, "openai") == (
        {
            "error": {
                "message": "Bad value.",
                "type": "invalid_request_error",
                "param": "messages[0].content",
                "code": None,
            }
        },
        400,
    )
    body, status = render_error(error, "anthropic")
    assert status == 400
    assert body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Bad value. (at `messages[0].content`)",
        },
    }
    assert render_error(error, "ollama") == (
        {"error": "Bad value. (at `messages[0].content`)"},
        400,
    )


@pytest.mark.parametrize(
    ("status", "anthropic_type", "ollama_status"),
    [
        (401, "authentication_error", 401),
        (404, "not_found_error", 404),
        (413, "request_too_large", 413),
        (429, "rate_limit_error", 503),
        (499, "api_error", 499),
        (500, "api_error", 500),
        (503, "api_error", 503),
    ],
)
def test_status_mappings(status: int, anthropic_type: str, ollama_status: int) -> None:
    error = ApiError(status, "x")
    body, _ = render_error(error, "anthropic")
    assert body["error"]["type"] == anthropic_type  # type: ignore[index]
    assert render_error(error, "ollama")[1] == ollama_status


def test_decode_errors_name_the_field() -> None:
    from exo_trio.api.anthropic import MessagesRequest

    with pytest.raises(ApiError) as missing:
        decode_body(b'{"model": "m", "messages": []}', MessagesRequest)
    assert missing.value.status == 400 and "max_tokens" in missing.value.message
    with pytest.raises(ApiError) as wrong:
        decode_body(b'{"model": "m", "messages": [], "max_tokens": "9"}', MessagesRequest)
    assert wrong.value.param == "max_tokens"
    with pytest.raises(ApiError) as malformed:
        decode_body(b'{"model": ', MessagesRequest)
    assert malformed.value.code == "invalid_json"
    with pytest.raises(ApiError):
        decode_body(b"[1, 2]", MessagesRequest)


def test_build_params_checks_ranges_in_the_dialects_names() -> None:
    params = build_params(
        max_tokens=5, temperature=0.5, top_k=3, stop=["a"], logit_bias={"7": -100}
    )
    assert params.top_k == 3 and params.stop == ("a",) and params.logit_bias == {7: BAN}
    with pytest.raises(ApiError) as hot:
        build_params(max_tokens=5, temperature=1.5, max_temperature=1.0)
    assert hot.value.param == "temperature"
    with pytest.raises(ApiError) as stops:
        build_params(max_tokens=5, temperature=1, stop=["a"] * 5)
    assert stops.value.param == "stop"
    build_params(max_tokens=5, temperature=1, stop=["a"] * 5, max_stops=None)
    with pytest.raises(ApiError) as zero:
        build_params(max_tokens=0, temperature=1, names={"max_tokens": "options.num_predict"})
    assert zero.value.param == "options.num_predict"
    for bad in ({"x": 1.0}, {"1": 101.0}):
        with pytest.raises(ApiError):
            build_params(max_tokens=1, temperature=1, logit_bias=bad)
    with pytest.raises(ApiError):
        build_params(max_tokens=1, temperature=1, top_p=0)
    with pytest.raises(ApiError):
        build_params(max_tokens=1, temperature=float("nan"))


def test_ollama_num_predict_is_capped_at_the_context() -> None:
    model = ModelCard(id="m", context_length=100, created=0)
    prompt = [5] * 40

    def params(options: OllamaOptions | None) -> SamplingParams:
        return ollama_params(ChatRequest(model="m", options=options), model, prompt)

    assert params(None).max_tokens == 60
    assert params(OllamaOptions(num_predict=-2)).max_tokens == 60
    assert params(OllamaOptions(num_predict=10)).max_tokens == 10
    assert params(OllamaOptions(num_predict=500)).max_tokens == 60
    defaults = params(None)
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.8, 0.9, 40)
    with pytest.raises(ApiError):
        params(OllamaOptions(num_predict=0))


def test_the_stop_matcher_reports_which_stop_ended_the_text() -> None:
    matcher = StopStringMatcher(["xyz", "ab", "abc"])
    assert matcher.push("12a") == ("12", False)
    assert matcher.push("bc") == ("", True)
    assert matcher.matched == "ab"
    plain = StopStringMatcher(["zz"])
    plain.push("hello")
    assert plain.matched is None


def chunk(rid: str, seq: int) -> ChunkGenerated:
    return ChunkGenerated(request_id=rid, seq=seq, token=seq, text=str(seq))


async def test_registry_cancel_ends_the_stream_and_counts_later_events_as_late() -> None:
    registry = StreamRegistry()
    stream = registry.open("r1", max_tokens=8)
    assert registry.deliver(chunk("r1", 0))
    assert registry.cancel("r1", "cancelled by a test")
    # Tokens still in the runner's pipe arrive after the cancel: late, not violations.
    assert not registry.deliver(chunk("r1", 1))
    assert registry.statistics().late_events == 1 and registry.statistics().after_terminal == 0
    received = [event async for event in stream]
    assert [type(e) for e in received] == [ChunkGenerated, GenerationFailed]
    assert isinstance(received[-1], GenerationFailed) and received[-1].kind == "cancelled"
    assert not registry.cancel("r1", "twice")
    registry.close("r1")
    assert not registry.cancel("r1", "closed")
    assert not registry.cancel("never-opened", "unknown")


async def test_registry_cancel_after_the_terminal_event_is_refused() -> None:
    registry = StreamRegistry()
    registry.open("r2", max_tokens=2)
    registry.deliver(
        GenerationFinished(
            request_id="r2", chunks=0, finish_reason="stop", prompt_tokens=1, completion_tokens=0
        )
    )
    assert not registry.cancel("r2", "too late")


async def test_timing_measures_on_trios_clock() -> None:
    timing = Timing()
    await trio.sleep(0.01)
    ttft, gap = timing.token(trio.current_time())
    assert ttft is not None and ttft >= 0.01 and gap is None
    await trio.sleep(0.01)
    ttft, gap = timing.token(trio.current_time())
    assert ttft is None and gap is not None and gap >= 0.01
    timing.ended = trio.current_time()
    assert timing.total_seconds == pytest.approx(timing.prefill_seconds + timing.decode_seconds)


def test_exposure_needs_a_key_beyond_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    check_exposure("127.0.0.1", ApiSettings(), False)
    check_exposure("0.0.0.0", ApiSettings(api_key="k"), False)
    check_exposure("0.0.0.0", ApiSettings(), True)
    with pytest.raises(SystemExit, match="insecure-no-api-key"):
        check_exposure("0.0.0.0", ApiSettings(), False)


def test_the_api_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from exo_trio.cli import parse_args

    monkeypatch.setenv("EXO_TRIO_API_KEY", "from-env")
    assert parse_args(["node"]).api_key == "from-env"
    assert parse_args(["node", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("EXO_TRIO_API_KEY")
    args = parse_args(["node"])
    assert args.api_key is None and args.cors_origin == [] and not args.insecure_no_api_key
