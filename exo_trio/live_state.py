"""The cluster as a node sees it, for people and scripts: a snapshot, and what
changed between two snapshots (pure functions).

The node's event stream (`GET /v1/events`, api/events.py) sends a subscriber one
whole snapshot, then only what changed. A snapshot is plain JSON-able data, one
entry per section:

- keyed sections (`nodes`, `links`, `instances`, `downloads`): a dict of id ->
  object; each object that appears, differs or disappears is one change;
- whole sections (`cluster`, `metrics`): one object, one change when it differs.

Comparing snapshots, rather than forwarding every notification, makes the stream
level-triggered: a change point may fire twice or not at all for a value that
moves on its own (free memory, a download's bytes), and a subscriber that falls
behind gets the changes coalesced, never a backlog.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Snapshot = Mapping[str, Any]
Op = Literal["added", "changed", "removed"]

# Section -> the event name of one of its changes. Order: the cluster first, so a
# reader knows the leader before the nodes, and the nodes before their instances.
KEYED = {"nodes": "node", "links": "link", "instances": "instance", "downloads": "download"}
WHOLE = {"cluster": "cluster", "metrics": "metrics"}
ORDER = ("cluster", "nodes", "links", "instances", "downloads", "metrics")


def snapshot(state: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A snapshot from the cluster's state (`Cluster.state()`, what `GET /state`
    answers) and this node's metrics: nodes with their memory, addresses and
    runners; every link between two nodes of the view (up, its kind and round
    trip; down when neither end reports it); instances with each shard's runner;
    downloads in flight here."""
    me = state["node_id"]
    leader = state["leader"]
    view = {n["node_id"]: n for n in state.get("nodes", [])}
    nodes = {node_id: _node(n, node_id == leader, node_id == me) for node_id, n in view.items()}
    runners = {
        (r["instance_id"], r["rank"]): r for n in view.values() for r in n.get("runners", [])
    }
    instances = {}
    for instance in state.get("instances", []):
        shards = []
        for shard in instance["shards"]:
            runner = runners.get((instance["id"], shard["rank"]), {})
            shards.append(
                {
                    **shard,
                    "runner": runner.get("state"),
                    "active_requests": runner.get("active_requests", 0),
                    "runner_error": runner.get("error"),
                }
            )
        instances[instance["id"]] = {**instance, "shards": shards}
    return {
        "cluster": {
            "node_id": me,
            "leader": leader,
            "term": state.get("term", 0),
            "members": list(state.get("members", [])),
        },
        "nodes": nodes,
        "links": _links(view, me),
        "instances": instances,
        "downloads": {d["model"]: d for d in state.get("downloads", []) if "model" in d},
        "metrics": dict(metrics or {}),
    }


def _node(summary: Mapping[str, Any], leader: bool, me: bool) -> dict[str, Any]:
    facts = summary.get("facts") or {}
    total = facts.get("memory_total", 0)
    free = _coarse(summary["memory_free"])
    return {
        "id": summary["node_id"],
        "host": summary["host"],
        "addresses": [
            {"host": a["host"], "kind": a.get("kind", ""), "interface": a.get("interface", "")}
            for a in facts.get("addresses", [])
        ],
        "memory_free": free,
        "memory_total": total,
        "memory_used": max(0, total - free) if total else None,
        "models": list(summary.get("models", [])),
        "runners": list(summary.get("runners", [])),
        "leader": leader,
        "self": me,
    }


# Free memory moves with every page the OS touches: the snapshot keeps it to this
# grain, so the stream does not tick with every report.
MEMORY_GRAIN = 64 * 2**20


def _coarse(size: int) -> int:
    return round(size / MEMORY_GRAIN) * MEMORY_GRAIN


def _links(view: Mapping[str, Mapping[str, Any]], me: str) -> dict[str, Any]:
    """One entry per pair of nodes in the view, keyed "a|b" (a < b). What an end
    reports wins; this node's own word first, then the smaller id's."""
    said: dict[tuple[str, str], dict[str, Any]] = {}
    for node_id in sorted(view, key=lambda n: (n != me, n)):
        for link in (view[node_id].get("facts") or {}).get("links", []):
            pair = tuple(sorted((node_id, link["peer"])))
            if link["peer"] in view and pair not in said:
                said[pair] = {"host": link["host"], "kind": link["kind"], "rtt": link.get("rtt")}
    links = {}
    ids = sorted(view)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            seen = said.get((a, b))
            rtt = seen["rtt"] if seen else None
            links[f"{a}|{b}"] = {
                "a": a,
                "b": b,
                "up": seen is not None,
                "kind": seen["kind"] if seen else None,
                "host": seen["host"] if seen else None,
                "rtt_ms": round(rtt * 1000, 1) if rtt is not None else None,
            }
    return links


@dataclass(frozen=True)
class Change:
    """One event of the stream: `kind` names the section's item ("node", "link",
    ...), `id` the item (None for a whole section), `value` its new state (None
    when removed)."""

    kind: str
    op: Op
    id: str | None
    value: Any

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"op": self.op}
        if self.id is not None:
            body["id"] = self.id
        if self.value is not None:
            body["value"] = self.value
        return body


def diff(old: Snapshot | None, new: Snapshot) -> list[Change]:
    """The changes that turn `old` into `new` (everything is "added" when `old` is
    None). Sections missing from a snapshot count as empty."""
    before: Snapshot = old or {}
    changes: list[Change] = []
    for section in ORDER:
        if section in KEYED:
            changes += _keyed(KEYED[section], before.get(section) or {}, new.get(section) or {})
        else:
            value = new.get(section)
            previous = before.get(section)
            if value != previous and value is not None:
                op: Op = "added" if previous is None else "changed"
                changes.append(Change(WHOLE[section], op, None, value))
    return changes


def _keyed(kind: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    changes = []
    for key, value in new.items():
        if key not in old:
            changes.append(Change(kind, "added", key, value))
        elif old[key] != value:
            changes.append(Change(kind, "changed", key, value))
    changes += [Change(kind, "removed", key, None) for key in old if key not in new]
    return changes


def apply(snapshot: Snapshot, changes: list[Change]) -> dict[str, Any]:
    """`snapshot` with `changes` applied: what a subscriber rebuilds from the stream
    (the inverse of `diff`, so `apply(a, diff(a, b)) == b`)."""
    out: dict[str, Any] = {k: (dict(v) if k in KEYED else v) for k, v in snapshot.items()}
    sections = {v: k for k, v in {**KEYED, **WHOLE}.items()}
    for change in changes:
        section = sections[change.kind]
        if section in WHOLE:
            out[section] = change.value
            continue
        items = out.setdefault(section, {})
        assert change.id is not None
        if change.op == "removed":
            items.pop(change.id, None)
        else:
            items[change.id] = change.value
    return out
