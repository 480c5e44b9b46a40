"""Prometheus metrics of one node, in a registry of its own.

Each Node owns a CollectorRegistry rather than using prometheus-client's global
one, so that several nodes in one process (tests, the simulator) never share or
double-register counters. Values that are already counted elsewhere (runner
restarts, events for unknown requests, queue depth) are read at scrape time by a
collector instead of being copied into a second counter that could drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exo_trio.runner.protocol import PromptCacheStats
from exo_trio.types import GenerationEvent, GenerationFailed, GenerationFinished

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Time to first token spans prefill (milliseconds to many seconds); the gap
# between tokens is one decode step (about 1-100 ms on the hardware we target).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class NodeSnapshot:
    """What the scrape-time collector reads from the node's own state."""

    runner_ready: bool
    runner_active: int
    max_batch: int
    runner_restarts: int
    open_streams: int
    unknown_events: int
    late_events: int
    after_terminal_events: int
    # The local runner's prefix cache, as it last reported (None: no report yet).
    prompt_cache: PromptCacheStats | None = None


class _NodeCollector(Collector):
    def __init__(self, snapshot: Callable[[], NodeSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield GaugeMetricFamily(
            "exo_trio_runner_ready",
            "1 when the runner is loaded and takes requests.",
            value=int(s.runner_ready),
        )
        yield GaugeMetricFamily(
            "exo_trio_runner_active_requests",
            "Requests the runner currently holds.",
            value=s.runner_active,
        )
        yield GaugeMetricFamily(
            "exo_trio_queue_depth",
            "Requests held by the runner beyond its max batch (waiting to decode).",
            value=max(0, s.runner_active - s.max_batch) if s.max_batch else 0,
        )
        yield CounterMetricFamily(
            "exo_trio_runner_restarts",
            "Times the runner process was restarted.",
            value=s.runner_restarts,
        )
        yield GaugeMetricFamily(
            "exo_trio_open_streams",
            "Request channels currently registered.",
            value=s.open_streams,
        )
        orphans = CounterMetricFamily(
            "exo_trio_orphan_events",
            "Events that found no open channel: late (the request had just closed), "
            "unknown (never registered: a bug) or after_terminal (a protocol violation).",
            labels=["kind"],
        )
        orphans.add_metric(["late"], s.late_events)
        orphans.add_metric(["unknown"], s.unknown_events)
        orphans.add_metric(["after_terminal"], s.after_terminal_events)
        yield orphans
        cache = s.prompt_cache or PromptCacheStats()
        for name, help_text, value in (
            ("lookups", "Requests the runner started with its prefix cache on.", cache.lookups),
            ("hits", "Of those, requests that reused cached prompt tokens.", cache.hits),
            ("tokens_reused", "Prompt tokens taken from the cache.", cache.tokens_reused),
            ("evictions", "Entries dropped to stay within the bound.", cache.evictions),
        ):
            yield CounterMetricFamily(
                f"exo_trio_prompt_cache_{name}",
                f"{help_text} Counted since the runner started.",
                value=value,
            )
        for name, help_text, value in (
            ("bytes", "Bytes the runner's prefix cache holds.", cache.bytes),
            (
                "capacity_bytes",
                "The prefix cache's bound (--prompt-cache-bytes).",
                cache.capacity_bytes,
            ),
            ("entries", "Finished requests' KV states the prefix cache holds.", cache.entries),
        ):
            yield GaugeMetricFamily(f"exo_trio_prompt_cache_{name}", help_text, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "exo_trio_http_requests",
            "HTTP requests by endpoint (route rule) and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "exo_trio_requests_in_flight",
            "Generation requests admitted and not yet ended.",
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "exo_trio_prompt_tokens",
            "Prompt tokens of finished requests.",
            ["model"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "exo_trio_generated_tokens",
            "Tokens generated (chunks delivered).",
            ["model"],
            registry=self.registry,
        )
        self.generations = Counter(
            "exo_trio_generations",
            "Ended generations by outcome (stop, length, or the failure kind).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "exo_trio_time_to_first_token_seconds",
            "From dispatch to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "exo_trio_inter_token_seconds",
            "Gap between consecutive tokens of one request, as the API sees them.",
            ["model"],
            buckets=INTER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        # Per model: its generated_tokens, ttft and inter_token children.
        self._per_model: dict[str, tuple[Any, Any, Any]] = {}

    def watch(self, snapshot: Callable[[], NodeSnapshot]) -> None:
        """Read the node's own counters at every scrape."""
        self.registry.register(_NodeCollector(snapshot))

    def observe_token(self, model: str, ttft: float | None, gap: float | None) -> None:
        # Every token passes here: the model's children are looked up once, not
        # through labels() (validation, a lock, a tuple) three times a token.
        per_model = self._per_model.get(model)
        if per_model is None:
            per_model = self._per_model[model] = (
                self.generated_tokens.labels(model),
                self.ttft.labels(model),
                self.inter_token.labels(model),
            )
        generated, ttft_seconds, gap_seconds = per_model
        generated.inc()
        if ttft is not None:
            ttft_seconds.observe(ttft)
        if gap is not None:
            gap_seconds.observe(gap)

    def observe_end(self, model: str, event: GenerationEvent) -> None:
        if isinstance(event, GenerationFinished):
            self.prompt_tokens.labels(model).inc(event.prompt_tokens)
            self.generations.labels(model, event.finish_reason).inc()
        elif isinstance(event, GenerationFailed):
            self.generations.labels(model, event.kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
