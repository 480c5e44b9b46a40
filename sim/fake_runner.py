"""A fake runner that speaks the real runner protocol over any trio stream.

It stands in for the MLX runner process in the simulator and in unit tests of the
worker: it loads instantly (after reporting progress), runs one "decode step" per
`step_delay()` seconds, continuous-batches like the real engine (a request that
arrives while others decode joins at the next step), honours max_tokens, EOS (at
`eos_after` tokens unless ignore_eos) and Cancel (dropped before the next step,
acknowledged with CancelAck), and emits a deterministic token per (request, seq).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import trio

from exo_trio.framing import encode_frame, read_frames
from exo_trio.runner_protocol import CancelAck, Loading, Ready, Shutdown, WorkerToRunner
from exo_trio.types import (
    Cancel,
    ChunkGenerated,
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    TextGeneration,
)


def fake_token(request_id: str, seq: int) -> int:
    return zlib.crc32(f"{request_id}:{seq}".encode()) % 1000 + 10


def fake_text(token: int) -> str:
    return f"t{token} "


@dataclass
class _Active:
    command: TextGeneration
    emitted: int = 0


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
    ) -> None:
        self.stream = stream
        self.model = model
        self.step_delay = step_delay
        self.eos_after = eos_after
        self.context_length = context_length
        self.max_batch = max_batch
        self.active: dict[str, _Active] = {}
        self.steps = 0
        self.hung = False  # a hung runner stops stepping but keeps its pipe open
        self._wake = trio.Event()

    async def run(self) -> None:
        await self._send(
            [Loading(fraction=0.0, phase="fake load"), Loading(fraction=1.0, phase="fake load")]
        )
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
            nursery.start_soon(self._steps)
            async for command in read_frames(self.stream, WorkerToRunner):  # type: ignore[arg-type]
                if isinstance(command, Shutdown):
                    break
                await self._apply(command)
            # Input closed (or Shutdown): fail what is left and stop, like the real runner.
            await self._send(
                [
                    GenerationFailed(request_id=rid, kind="cancelled", message="runner stopping")
                    for rid in self.active
                ]
            )
            self.active.clear()
            nursery.cancel_scope.cancel()
        await self.stream.aclose()

    async def _apply(self, command: WorkerToRunner) -> None:
        if isinstance(command, TextGeneration):
            self.active[command.request_id] = _Active(command)
            self._wake.set()
        elif isinstance(command, Cancel):
            known = self.active.pop(command.request_id, None) is not None
            await self._send(
                [CancelAck(request_id=command.request_id, steps_after_cancel=0, known=known)]
            )

    async def _steps(self) -> None:
        while True:
            if not self.active or self.hung:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            await trio.sleep(self.step_delay())
            self.steps += 1
            events: list[GenerationEvent] = []
            for rid, job in list(self.active.items())[: self.max_batch]:
                events.extend(self._step_one(rid, job))
            await self._send(events)

    def _step_one(self, rid: str, job: _Active) -> list[GenerationEvent]:
        params = job.command.params
        prompt = len(job.command.prompt_tokens)
        if self.eos_after is not None and not params.ignore_eos and job.emitted >= self.eos_after:
            del self.active[rid]
            return [self._finished(rid, job, "stop", prompt)]
        token = fake_token(rid, job.emitted)
        events: list[GenerationEvent] = [
            ChunkGenerated(request_id=rid, seq=job.emitted, token=token, text=fake_text(token))
        ]
        job.emitted += 1
        if job.emitted >= params.max_tokens:
            del self.active[rid]
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
        )

    async def _send(self, messages: list[object]) -> None:
        if messages:
            await self.stream.send_all(b"".join(encode_frame(m) for m in messages))
