"""What GET /v1/events costs a node: its own CPU time with 0, 1 and 8 streams open.

    python -m bench.events [--rounds 2] [--idle 10]

Starts a real node serving the demo model and measures the node process's CPU
seconds (user + system, from /proc through psutil: CPU time, not wall time, so
other load on the machine moves the figures less), with N event streams open and
read by threads of this process: over an idle window, and over a fixed workload (4
answers of 200 tokens, one after the other). The stream counts are interleaved and
repeated; the averages are printed. The runner's own process is not counted: the
streams run in the node's. (docs/dashboard.md quotes a run.)
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from exo_trio.demo_model import build_demo_model
from tests.nodeproc import serving

STREAMS = (0, 1, 8)
ANSWERS = 4
TOKENS = 200


def open_streams(base_url: str, count: int, stop: threading.Event) -> None:
    def read() -> None:
        with httpx.stream("GET", f"{base_url}/v1/events", timeout=60) as response:
            for _ in response.iter_bytes():
                if stop.is_set():
                    return

    for _ in range(count):
        threading.Thread(target=read, daemon=True).start()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def workload(base_url: str) -> None:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
    }
    for _ in range(ANSWERS):
        answer = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
        answer.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds per idle window")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-events-"))
    model = build_demo_model(root / "demo")
    idle: dict[int, list[float]] = {n: [] for n in STREAMS}
    busy: dict[int, list[float]] = {n: [] for n in STREAMS}
    with serving(model, root / "node", "--cpu-affinity", "off") as node:
        process = psutil.Process(node.process.pid)
        workload(node.base_url)  # warm: the runner's first steps compile
        for round_ in range(args.rounds):
            for count in STREAMS:
                stop = threading.Event()
                open_streams(node.base_url, count, stop)
                time.sleep(1.5)  # the streams' snapshots are sent
                before, started = cpu_seconds(process), time.monotonic()
                time.sleep(args.idle)
                idle[count].append((cpu_seconds(process) - before) / (time.monotonic() - started))
                before = cpu_seconds(process)
                workload(node.base_url)
                busy[count].append(cpu_seconds(process) - before)
                stop.set()
                print(
                    f"round {round_}, {count} stream(s): idle {1000 * idle[count][-1]:.1f} ms"
                    f" CPU/s, workload {busy[count][-1]:.2f} s CPU",
                    flush=True,
                )
                time.sleep(2)  # the streams close (at their next event)
    print(f"\nthe node's CPU ({ANSWERS} answers of {TOKENS} tokens as the workload):")
    base_idle, base_work = (sum(idle[0]) / len(idle[0]), sum(busy[0]) / len(busy[0]))
    for count in STREAMS:
        idle_s = sum(idle[count]) / len(idle[count])
        work = sum(busy[count]) / len(busy[count])
        print(
            f"  {count} stream(s): idle {1000 * idle_s:5.1f} ms per second"
            f" ({idle_s / base_idle:.2f}x none), workload {work:.2f} s"
            f" ({work / base_work:.2f}x none)"
        )


if __name__ == "__main__":
    main()
