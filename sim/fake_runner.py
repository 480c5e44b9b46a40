"""A fake runner that speaks the real runner protocol over any trio stream.

It stands in for the MLX runner process in the simulator and in unit tests of the
worker: it loads instantly (after reporting progress), runs one "decode step" per
`step_delay()` seconds, continuous-batches like the real engine (a request that
arrives while others decode joins at the next step), honours max_tokens, EOS (at
`eos_after` tokens unless ignore_eos) and Cancel (dropped before the next step,
acknowledged with CancelAck), and emits a deterministic token per (request, seq).

With a prompt cache (`prompt_cache_tokens` > 0) and a prefill cost
(`prefill_seconds_per_token`) it models the real engine's starts too: the
requests that start in a step (up to the batch's room, those that arrived before
the step began) are prefilled together and all get their first token at the end
of that step, which lasts a decode step plus the prefill of the longest uncached
prompt among them; a finished or cancelled request's tokens are kept (LRU, at
most `prompt_cache_tokens` in all) and a later prompt sharing a prefix with them
prefills only the rest (its GenerationFinished says how many were cached). Both
default to off: the timing then stays what recorded schedules expect.

For the simulator it also reports what it did to an optional `RunnerObserver`
(the oracle the invariants compare clients against) and can hang (stop stepping
but keep its pipe open and keep reading commands).

A rank of a sharded instance (`group` given) behaves as exo_trio/runner/rank.py
describes the real ones: every rank reports Ready only once the whole group has
formed; only rank 0 takes commands and emits events (other ranks refuse work and
never step); while the group is stalled (a partition its TCP rides out) rank 0
does not step; and when the group breaks (any rank exits, its process dies, the
network between ranks is cut) every rank notices within a moment: rank 0 fails
its requests with `runner_died`, every rank sends RunnerError and exits.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from exo_trio.runner.framing import encode_frame, read_frames
from exo_trio.runner.protocol import (
    CancelAck,
    Loading,
    Ready,
    RunnerError,
    Shutdown,
    WorkerToRunner,
)
from exo_trio.types import (
    Cancel,
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    TextGeneration,
    TokenLogprob,
)


def fake_token(request_id: str, seq: int) -> int:
    return zlib.crc32(f"{request_id}:{seq}".encode()) % 1000 + 10


def fake_text(token: int) -> str:
    return f"t{token} "


# A request with tools (its prompt has the simulator encoder's "tools:" line) is
# answered with one tool call in the json_tools format wrapped around its
# tokens' text: opened by the first token, closed by the last one max_tokens
# allows, so a request cut short (cancelled, EOS, a fault) leaves an unclosed
# call, which the node gives back as text. Clients rebuild this text from the
# call they receive, so the exactly-once check covers calls too.
TOOL_CALL_OPEN = '<tool_call>{"name": "f", "arguments": {"a": "'
TOOL_CALL_CLOSE = '"}}</tool_call>'


def wants_tools(command: TextGeneration) -> bool:
    try:
        return "tools: " in "".join(map(chr, command.prompt_tokens))
    except (ValueError, OverflowError):
        return False


def fake_logprobs(
    token: int, text: str, top: int | None
) -> tuple[TokenLogprob | None, list[TokenLogprob]]:
    """A deterministic logprob for a token (when asked): the token is the most
    likely, its alternatives follow (as greedy decoding gives)."""
    if top is None:
        return None, []
    chosen = TokenLogprob(token, -0.5, text.encode())
    others = [TokenLogprob(token + i, -0.5 - i, f"t{token + i} ".encode()) for i in range(1, top)]
    return chosen, [chosen, *others][:top]


class RunnerObserver(Protocol):
    """What the simulator's ledger wants to know. Every call happens after the
    bytes concerned were queued on the pipe (send_all returned)."""

    def started(self, runner: FakeRunner, command: TextGeneration) -> None: ...

    def sent(self, runner: FakeRunner, events: list[GenerationEvent]) -> None: ...

    def cancelled(self, runner: FakeRunner, request_id: str, known: bool) -> None: ...

    def stopped(self, runner: FakeRunner, request_ids: list[str]) -> None: ...

    def died(self, runner: FakeRunner, request_ids: list[str]) -> None:
        """Rank 0 failed these requests because its group broke."""
        ...


class RunnerGroup:
    """The ranks of one sharded instance: what the real runners' mx.distributed
    group is to them. `nodes[r]` names where rank r runs (for the simulator)."""

    def __init__(self, instance_id: str, nodes: tuple[str, ...], form_timeout: float = 10.0):
        self.instance_id = instance_id
        self.nodes = nodes
        self.form_timeout = form_timeout
        self.joined: set[int] = set()
        self.formed = trio.Event()
        self.broken: str | None = None
        self.broken_at: float | None = None
        self.broken_event = trio.Event()
        self.stalled_until = 0.0
        self.ever_formed = False

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    def join(self, rank: int) -> None:
        self.joined.add(rank)
        if len(self.joined) == self.world_size and self.broken is None:
            self.ever_formed = True
            self.formed.set()

    def break_(self, cause: str) -> None:
        """The group is over (a rank exited or died, the network between ranks was
        cut); every rank notices and exits."""
        if self.broken is None:
            self.broken = cause
            self.broken_at = trio.current_time()
            self.broken_event.set()
            self.formed.set()

    def stall(self, until: float) -> None:
        """No collective completes before `until` (math.inf: a rank's machine
        vanished; the group then waits until it is torn down)."""
        self.stalled_until = max(self.stalled_until, until)


@dataclass
class _Active:
    command: TextGeneration
    emitted: int = 0
    cached: int = 0  # prompt tokens its start took from the prompt cache


class FakePromptCache:
    """The token bookkeeping of the real prefix cache (exo_trio/runner/prefix_cache.py)
    without KV: finished requests' tokens, LRU, at most `capacity` tokens in all; a
    lookup gives the longest prefix shared with a prompt, all of it but its last
    token at most."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, ...], None] = OrderedDict()  # LRU first
        self.held = 0

    def lookup(self, prompt: Sequence[int]) -> int:
        best, best_key = 0, None
        for key in reversed(self.entries):
            shared = 0
            for a, b in zip(key, prompt[: len(prompt) - 1], strict=False):
                if a != b:
                    break
                shared += 1
            if shared > best:
                best, best_key = shared, key
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best

    def store(self, tokens: Sequence[int]) -> None:
        key = tuple(tokens)
        if not key or len(key) > self.capacity:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.entries[key] = None
        self.held += len(key)
        while self.held > self.capacity:
            oldest, _ = self.entries.popitem(last=False)
            self.held -= len(oldest)


class FakeRunner:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        model: str = "fake",
        step_delay: Callable[[], float] = lambda: 0.01,
        eos_after: int | None = None,
        context_length: int = 4096,
        max_batch: int = 8,
        text_of: Callable[[int, int], str] | None = None,
        observer: RunnerObserver | None = None,
        index: int = 0,
        group: RunnerGroup | None = None,
        rank: int = 0,
        detect_delay: Callable[[], float] = lambda: 0.0,
        prompt_cache_tokens: int = 0,
        prefill_seconds_per_token: float = 0.0,
    ) -> None:
        self.stream = stream
        self.model = model
        self.step_delay = step_delay
        self.eos_after = eos_after
        self.context_length = context_length
        self.max_batch = max_batch
        self.text_of = text_of or (lambda seq, token: fake_text(token))
        self.observer = observer
        self.index = index  # which incarnation (the simulator restarts runners)
        self.active: dict[str, _Active] = {}
        self.steps = 0
        self.hung = False  # a hung runner stops stepping but keeps its pipe open
        self._wake = trio.Event()
        self.group = group
        self.rank = rank
        self.detect_delay = detect_delay
        self._stopping = False
        # Starts modelled (see the module docstring), or every active request
        # simply emits a token each step.
        self.models_starts = prompt_cache_tokens > 0 or prefill_seconds_per_token > 0
        self.prompt_cache = FakePromptCache(prompt_cache_tokens)
        self.prefill_seconds_per_token = prefill_seconds_per_token
        self.cache_hits = 0  # requests started with cached tokens
        self.burst_starts = 0  # steps that started more than one request

    async def run(self) -> None:
        await self._send(
            [Loading(fraction=0.0, phase="fake load"), Loading(fraction=1.0, phase="fake load")]
        )
        group = self.group
        if group is not None:
            group.join(self.rank)
            with trio.move_on_after(group.form_timeout):
                await group.formed.wait()
            if group.broken is not None or not group.formed.is_set():
                group.break_(f"rank {self.rank} could not form the group")
                await self._send([RunnerError(message="could not form the distributed group")])
                await self.stream.aclose()
                return
        await self._send(
            [
                Ready(
                    model=self.model,
                    context_length=self.context_length,
                    max_batch=self.max_batch,
                    pid=0,
                )
            ]
        )
        async with trio.open_nursery() as nursery:
            if self.rank == 0:
                nursery.start_soon(self._steps)
            if group is not None:
                nursery.start_soon(self._watch_group, nursery.cancel_scope)
            async for command in read_frames(self.stream, WorkerToRunner):  # type: ignore[arg-type]
                if isinstance(command, Shutdown):
                    break
                await self._apply(command)
            # Input closed (or Shutdown): fail what is left and stop, like the real runner.
            left = list(self.active)
            self.active.clear()
            self._stopping = True
            if group is not None:
                # Any rank stopping ends the group (rank 0 tells the others to stop).
                group.break_(f"rank {self.rank} stopped")
            await self._send(
                [
                    GenerationFailed(request_id=rid, kind="cancelled", message="runner stopping")
                    for rid in left
                ]
            )
            if self.observer is not None and left:
                self.observer.stopped(self, left)
            nursery.cancel_scope.cancel()
        await self.stream.aclose()

    # ---- simulator controls ----

    def hang(self) -> None:
        self.hung = True

    def resume(self) -> None:
        self.hung = False
        self._wake.set()

    def died(self) -> None:
        """The process is gone: whatever it held is lost (the worker fails it)."""
        left = list(self.active)
        self.active.clear()
        if self.observer is not None and left:
            self.observer.stopped(self, left)

    # ---- the group ----

    async def _watch_group(self, scope: trio.CancelScope) -> None:
        """When the group breaks, fail what rank 0 holds and leave (RunnerError)."""
        assert self.group is not None
        await self.group.broken_event.wait()
        await trio.sleep(self.detect_delay())
        if self._stopping:
            return
        self._stopping = True
        left = list(self.active)
        self.active.clear()
        failures: list[object] = [
            GenerationFailed(
                request_id=rid,
                kind="runner_died",
                message=f"the distributed group broke: {self.group.broken}",
            )
            for rid in left
        ]
        with trio.CancelScope(shield=True):
            try:
                await self._send([*failures, RunnerError(message=f"group: {self.group.broken}")])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if self.observer is not None and left:
            self.observer.died(self, left)
        scope.cancel()

    # ---- protocol ----

    async def _apply(self, command: WorkerToRunner) -> None:
        if self.rank != 0:
            # Only rank 0 takes commands (as the real sharded runner).
            if isinstance(command, TextGeneration):
                await self._send(
                    [
                        GenerationFailed(
                            request_id=command.request_id,
                            kind="invalid",
                            message=f"rank {self.rank} takes no requests",
                        )
                    ]
                )
            elif isinstance(command, Cancel):
                await self._send(
                    [CancelAck(request_id=command.request_id, steps_after_cancel=0, known=False)]
                )
            return
        if isinstance(command, TextGeneration):
            self.active[command.request_id] = _Active(command)
            if self.observer is not None:
                self.observer.started(self, command)
            self._wake.set()
        elif isinstance(command, Cancel):
            job = self.active.pop(command.request_id, None)
            known = job is not None
            if job is not None:
                self._keep(job)
            if self.observer is not None:
                self.observer.cancelled(self, command.request_id, known)
            await self._send(
                [CancelAck(request_id=command.request_id, steps_after_cancel=0, known=known)]
            )

    async def _steps(self) -> None:
        while True:
            if not self.active or self.hung:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            delay = self.step_delay()
            starting: list[_Active] = []
            if self.models_starts:
                starting = self._starting()
                delay += self.prefill_seconds_per_token * max(
                    (len(job.command.prompt_tokens) - job.cached for job in starting), default=0
                )
            await trio.sleep(delay)
            group = self.group
            if group is not None and group.stalled_until > trio.current_time():
                await trio.sleep_until(group.stalled_until)  # a collective waits
                continue
            if self.hung or not self.active:
                continue
            self.steps += 1
            events: list[GenerationEvent] = []
            jobs = list(self.active.items())[: self.max_batch]
            if self.models_starts:
                # What arrived during the step starts at the next one, as in the engine.
                started = {job.command.request_id for job in starting}
                jobs = [(rid, job) for rid, job in jobs if job.emitted or rid in started]
                self.cache_hits += sum(1 for _, job in jobs if not job.emitted and job.cached)
                if sum(1 for _, job in jobs if not job.emitted) > 1:
                    self.burst_starts += 1
            for rid, job in jobs:
                events.extend(self._step_one(rid, job))
            await self._send(events)
            if self.observer is not None:
                self.observer.sent(self, events)

    def _starting(self) -> list[_Active]:
        """The requests the next step starts (those waiting within the batch's
        room), each looked up in the prompt cache."""
        starting = [job for job in list(self.active.values())[: self.max_batch] if job.emitted == 0]
        for job in starting:
            job.cached = self.prompt_cache.lookup(job.command.prompt_tokens)
        return starting

    def _keep(self, job: _Active) -> None:
        """A request is over: its prompt and what it generated go into the cache."""
        if self.models_starts:
            rid = job.command.request_id
            generated = [fake_token(rid, seq) for seq in range(job.emitted)]
            self.prompt_cache.store([*job.command.prompt_tokens, *generated])

    def _step_one(self, rid: str, job: _Active) -> list[GenerationEvent]:
        params = job.command.params
        prompt = len(job.command.prompt_tokens)
        if self.eos_after is not None and not params.ignore_eos and job.emitted >= self.eos_after:
            del self.active[rid]
            self._keep(job)
            return [self._finished(rid, job, "stop", prompt)]
        token = fake_token(rid, job.emitted)
        text = self.text_of(job.emitted, token)
        if wants_tools(job.command):
            if job.emitted == 0:
                text = TOOL_CALL_OPEN + text
            if job.emitted == params.max_tokens - 1:
                text += TOOL_CALL_CLOSE
        logprob, top = fake_logprobs(token, text, params.logprobs)
        events: list[GenerationEvent] = [
            ChunkGenerated(
                request_id=rid,
                seq=job.emitted,
                token=token,
                text=text,
                logprob=logprob,
                top_logprobs=top,
            )
        ]
        job.emitted += 1
        if job.emitted >= params.max_tokens:
            del self.active[rid]
            self._keep(job)
            events.append(self._finished(rid, job, "length", prompt))
        return events

    @staticmethod
    def _finished(rid: str, job: _Active, reason: str, prompt: int) -> GenerationFinished:
        return GenerationFinished(
            request_id=rid,
            chunks=job.emitted,
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=prompt,
            completion_tokens=job.emitted,
            cached_tokens=job.cached,
        )

    async def _send(self, messages: list[object]) -> None:
        if messages:
            await self.stream.send_all(b"".join(encode_frame(m) for m in messages))
