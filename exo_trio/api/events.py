"""GET /v1/events: the cluster as this node sees it, as server-sent events.

A subscriber first gets one `snapshot` event (the whole state: exo_trio/live_state.py
says what is in it), then one event per change, named after what changed: `cluster`
(leader, term, members), `node`, `link`, `instance`, `download`, `metrics`. A
change's data is `{"op": "added" | "changed" | "removed", "id": ..., "value": ...}`;
every event has an increasing `id:`. The dashboard is built on it, and so can a
script be: `curl -N http://127.0.0.1:52415/v1/events` (docs/dashboard.md).

Cost and back-pressure. The node's change points (runners, shards, the cluster's
view) call `Publisher.poke` (exo_trio/publisher.py), which does nothing while nobody subscribes (one
integer test) and otherwise wakes the streams. Each stream then takes a snapshot
of its own and sends what differs from the last one it sent; it also looks every
`SAMPLE` seconds, for what moves on its own (free memory, link latency, download
bytes, the metrics). So a subscriber holds one snapshot, never a queue of events:
one that reads slowly gets the changes coalesced, and one that stops reading
blocks only its own write, which `--send-timeout` ends (api/serving.py) like any
other stalled client. Never more than `MAX_SUBSCRIBERS` streams at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import trio
from quart import Response

from exo_trio import live_state
from exo_trio.api.admission import at_exchange_end
from exo_trio.api.context import ApiContext
from exo_trio.api.errors import ApiError
from exo_trio.api.instances import state  # /state's body: what a snapshot is made of
from exo_trio.node import Node

# Seconds between looks when nothing pokes: the grain of the metrics' rates too.
SAMPLE = 1.0
# An SSE comment this often on a quiet stream, so proxies keep it open.
KEEPALIVE = 15.0
MAX_SUBSCRIBERS = 32

_json = msgspec.json.Encoder()


class MetricsSampler:
    """This node's own metrics (its Prometheus registry), for the stream: requests
    in flight, queue depth, open streams, and tokens per second per model (the
    generated-tokens counter's rate since the previous sample)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._last: tuple[float, dict[str, float]] | None = None

    def sample(self) -> dict[str, Any]:
        values: dict[str, float] = {}
        tokens: dict[str, float] = {}
        for metric in self.node.metrics.registry.collect():
            for s in metric.samples:
                if s.name == "exo_trio_generated_tokens_total":
                    tokens[s.labels["model"]] = s.value
                elif not s.labels:
                    values[s.name] = s.value
        now = trio.current_time()
        rates = {model: 0.0 for model in tokens}
        if self._last is not None and now > self._last[0]:
            then, before = self._last
            rates = {m: (n - before.get(m, 0.0)) / (now - then) for m, n in tokens.items()}
        self._last = (now, tokens)
        return {
            "in_flight": int(values.get("exo_trio_requests_in_flight", 0)),
            "queue_depth": int(values.get("exo_trio_queue_depth", 0)),
            "open_streams": int(values.get("exo_trio_open_streams", 0)),
            "runner_active": int(values.get("exo_trio_runner_active_requests", 0)),
            "models": {
                m: {"tokens_per_second": round(rates[m], 1), "generated_tokens": int(n)}
                for m, n in sorted(tokens.items())
            },
        }


def sse(event: str, event_id: int, payload: object) -> bytes:
    return (
        b"id: %d\nevent: %s\ndata: " % (event_id, event.encode()) + _json.encode(payload) + b"\n\n"
    )


async def events(ctx: ApiContext) -> Response:
    publisher = ctx.events
    await state(ctx)  # 404 now, as a plain error, on a node without the cluster
    # No await from this test to the count below, so no two streams pass it at once.
    if publisher.subscribers >= MAX_SUBSCRIBERS:
        raise ApiError(
            503,
            f"Too many event streams open on this node (limit {MAX_SUBSCRIBERS}).",
            type="server_error",
            code="too_many_subscribers",
        )
    sampler = MetricsSampler(ctx.node)

    async def look() -> dict[str, Any]:
        metrics = {**sampler.sample(), "event_streams": publisher.subscribers}
        return live_state.snapshot(await state(ctx), metrics)

    async def stream() -> AsyncIterator[bytes]:
        event_id = 1
        last = await look()
        yield b"retry: 1000\n" + sse("snapshot", event_id, last)
        quiet = trio.current_time()
        while not ctx.node.draining:
            with trio.move_on_after(SAMPLE):
                await publisher.next_change()
            now = await look()
            changes = live_state.diff(last, now)
            last = now
            for change in changes:
                event_id += 1
                yield sse(change.kind, event_id, change.payload())
            if changes:
                quiet = trio.current_time()
            elif trio.current_time() - quiet >= KEEPALIVE:
                quiet = trio.current_time()
                yield b": keep-alive\n\n"

    # Counted until the HTTP exchange ends, however it ends: a generator's own
    # `finally` would wait for its finalization when its client vanishes mid-yield.
    publisher.subscribers += 1
    at_exchange_end(publisher.leave)
    return Response(
        stream(),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
