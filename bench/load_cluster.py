"""Multi-node fault scenarios of the load harness: a link cut under load, and a
node killed and restarted under load. Each builds its own small cluster of real
node processes on loopback (authenticated links, explicit peers, no discovery, the
model placed by hand) and returns a Report row like the single-node scenarios.

- link: node x runs the model; node y reaches x only through a TCP proxy that the
  harness cuts and heals (tests/netproxy.py). Clients stream through y, so every
  token crosses the link. Every request in flight at a cut must end with an error
  event; after the heal y must serve exact streams again.
- nodekill: node b runs the model, clients stream through node a; b is SIGKILLed,
  restarted (same id, same data dir, same port) and the model placed on it again.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import httpx
import trio

from bench import probe
from bench.loadclient import DIALECTS, Plan
from bench.loadharness import PROMPTS, Harness, Report, account_faults, run_loop
from tests.netproxy import CuttableProxy
from tests.nodeproc import NodeProcess, free_port, start_node

SECRET = "load-harness-secret"


class Cluster:
    def __init__(self, model: Path, root: Path) -> None:
        self.model = model
        self.root = root
        self.ports: dict[str, int] = {}
        self.peers: dict[str, list[int]] = {}
        self.nodes: dict[str, NodeProcess] = {}

    def start(self, name: str) -> NodeProcess:
        args = ["--node-id", name, "--listen", f"127.0.0.1:{self.ports[name]}"]
        args += ["--cluster-secret", SECRET, "--no-discovery", "--placement", "manual"]
        args += ["--max-batch", "32", "--max-queued", "4096", "--keepalive", "1"]
        for port in self.peers[name]:
            args += ["--peer", f"127.0.0.1:{port}"]
        self.nodes[name] = start_node(self.model, self.root / name, *args)
        return self.nodes[name]

    def url(self, name: str) -> str:
        return self.nodes[name].base_url

    def state(self, name: str) -> dict[str, object]:
        return httpx.get(f"{self.url(name)}/state", timeout=10).json()  # type: ignore[no-any-return]

    def ready(self, name: str) -> bool:
        try:
            instances = self.state(name)["instances"]
        except httpx.HTTPError:
            return False
        assert isinstance(instances, list)
        return (
            any(i["state"] == "ready" for i in instances) and probe.health(self.url(name))[0] == 200
        )

    def place(self, via: str, on: list[str]) -> None:
        for instance in self.state(via)["instances"]:  # type: ignore[attr-defined]
            httpx.delete(f"{self.url(via)}/v1/instances/{instance['id']}", timeout=30)
        wait(lambda: not self.state(via)["instances"], "instances gone")
        response = httpx.post(
            f"{self.url(via)}/v1/instances", json={"model": "demo", "nodes": on}, timeout=30
        )
        response.raise_for_status()
        wait(lambda: self.ready(via), "instance ready")

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.process.poll() is None:
                node.stop()


def wait(predicate: object, what: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


async def wait_async(predicate: object, limit: float = 120.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if await trio.to_thread.run_sync(predicate):  # type: ignore[arg-type]
            break
        await trio.sleep(0.1)
    return time.monotonic() - started


def link(args: argparse.Namespace, model: Path, root: Path, eos: list[int]) -> Report:
    report = Report("link cut")
    cluster = Cluster(model, root / "link")
    cluster.ports = {"x": free_port(), "y": free_port()}
    proxy = CuttableProxy(cluster.ports["x"])
    cluster.peers = {"x": [], "y": [proxy.port]}
    heals: list[float] = []
    try:
        cluster.start("x")
        cluster.start("y")
        wait(lambda: cluster.state("y")["members"] == ["x", "y"], "link up")
        cluster.place("y", ["x"])
        h = Harness(cluster.nodes["y"], eos, random.Random(args.seed))
        h.take_references()
        h.measure_before(report)

        async def cutter(faults: list[float]) -> None:
            for _ in range(args.cuts):
                await trio.sleep(h.rng.uniform(2.0, 4.0))
                faults.append(time.monotonic())
                proxy.cut()
                await trio.sleep(args.cut_for)
                proxy.heal()
                heals.append(await wait_async(lambda: cluster.ready("y")))

        started = time.monotonic()
        outcomes, cuts = run_loop(h, args.cluster_clients, args.cluster_seconds, cutter, DIALECTS)
        report.seconds = time.monotonic() - started
        h.account(report, outcomes)
        affected = account_faults(report, outcomes, cuts)
        report.notes.append(
            f"{len(cuts)} cuts of {args.cut_for:g}s, {affected} requests in flight failed by "
            "them; serving again " + ", ".join(f"{t:.1f}s" for t in heals) + " after the heals"
        )
        check(h, report, "after the cuts")
        h.measure_after(report)
        leftover_on(report, cluster, "x")
    finally:
        cluster.stop()
        proxy.close()
    return report


def nodekill(args: argparse.Namespace, model: Path, root: Path, eos: list[int]) -> Report:
    report = Report("node kill")
    cluster = Cluster(model, root / "nodekill")
    cluster.ports = {"a": free_port(), "b": free_port()}
    cluster.peers = {"a": [cluster.ports["b"]], "b": [cluster.ports["a"]]}
    back: list[float] = []
    try:
        cluster.start("a")
        cluster.start("b")
        wait(lambda: cluster.state("a")["members"] == ["a", "b"], "cluster formed")
        cluster.place("a", ["b"])
        h = Harness(cluster.nodes["a"], eos, random.Random(args.seed))
        h.take_references()
        h.measure_before(report)

        async def killer(faults: list[float]) -> None:
            for _ in range(args.node_kills):
                await trio.sleep(h.rng.uniform(2.0, 4.0))
                faults.append(time.monotonic())
                cluster.nodes["b"].process.kill()
                await trio.to_thread.run_sync(cluster.nodes["b"].process.wait)
                await trio.to_thread.run_sync(cluster.start, "b")
                # Not /health: b holds no instance (so is not healthy) until placed.
                await wait_async(lambda: member_of(cluster, "a", "b"))
                await wait_async(lambda: member_of(cluster, "b", "a"))
                await trio.to_thread.run_sync(cluster.place, "a", ["b"])
                back.append(time.monotonic() - faults[-1])

        started = time.monotonic()
        outcomes, kills = run_loop(h, args.cluster_clients, args.cluster_seconds, killer, DIALECTS)
        report.seconds = time.monotonic() - started
        h.account(report, outcomes)
        affected = account_faults(report, outcomes, kills)
        report.notes.append(
            f"{len(kills)} kills of node b, {affected} requests in flight failed by them; "
            "b restarted and serving again in " + ", ".join(f"{t:.1f}s" for t in back)
        )
        check(h, report, "after the kills")
        h.measure_after(report)
        leftover_on(report, cluster, "b")
    finally:
        cluster.stop()
    return report


def member_of(cluster: Cluster, name: str, member: str) -> bool:
    try:
        members = cluster.state(name)["members"]
    except httpx.HTTPError:
        return False
    return isinstance(members, list) and member in members


def check(h: Harness, report: Report, when: str) -> None:
    after = h.run([Plan(0, d, True, *PROMPTS[0]) for d in DIALECTS], ramp=0.1)
    fresh = Report("after")
    h.account(fresh, after)
    report.notes.append(f"{when}: {fresh.exact}/{len(after)} dialects exact")


def leftover_on(report: Report, cluster: Cluster, name: str) -> None:
    """The other node must be quiet too (the instance side of the relay)."""
    _, left = probe.wait_quiet(cluster.url(name))
    for key, value in (
        ("in_flight", left.in_flight),
        ("open_streams", left.open_streams),
        ("runner_active", left.runner_active),
    ):
        if value:
            report.leaked[f"{name}:{key}"] = value
