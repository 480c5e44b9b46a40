"""The dashboard's event stream, decided by pure functions: a snapshot of the
cluster's state, and the changes between two snapshots."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from exo_trio.live_state import MEMORY_GRAIN, apply, diff, snapshot

GiB = 2**30


def node(node_id: str, *, free: int = 8 * GiB, links: list[dict[str, Any]] | None = None,
         runners: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "node_id": node_id,
        "memory_free": free,
        "models": ["demo"],
        "host": "10.0.0.1",
        "facts": {
            "memory_total": 16 * GiB,
            "addresses": [
                {"host": "169.254.3.4", "port": 1, "interface": "bridge0", "kind": "thunderbolt"}
            ],
            "links": links or [],
        },
        "runners": runners or [],
    }


def state(*nodes: dict[str, Any], instances: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "node_id": "a",
        "leader": "a",
        "term": 3,
        "members": [n["node_id"] for n in nodes],
        "nodes": list(nodes),
        "instances": instances or [],
    }


SPLIT = {
    "id": "inst-1",
    "model": "demo",
    "sharding": "pipeline",
    "state": "ready",
    "shards": [
        {"node_id": "a", "rank": 0, "start_layer": 0, "end_layer": 3},
        {"node_id": "b", "rank": 1, "start_layer": 3, "end_layer": 4},
    ],
}


def test_a_snapshot_shows_nodes_links_and_how_each_instance_is_split() -> None:
    runner = {"instance_id": "inst-1", "rank": 1, "state": "loading", "active_requests": 2}
    view = state(
        node(
            "a", links=[{"peer": "b", "host": "169.254.9.9", "kind": "thunderbolt", "rtt": 0.0004}]
        ),
        node("b", free=8 * GiB + 5, runners=[runner]),
        node("c"),
        instances=[SPLIT],
    )
    snap = snapshot(view, {"in_flight": 1})
    assert snap["cluster"] == {"node_id": "a", "leader": "a", "term": 3, "members": ["a", "b", "c"]}
    a, b = snap["nodes"]["a"], snap["nodes"]["b"]
    assert a["leader"] and a["self"] and not b["leader"] and not b["self"]
    assert a["memory_used"] == 8 * GiB and a["addresses"][0]["kind"] == "thunderbolt"
    assert b["memory_free"] % MEMORY_GRAIN == 0  # coarse: no event per page the OS moves
    # Every pair of nodes has a link entry: a reports a-b; nobody reports b-c or a-c.
    assert snap["links"]["a|b"] == {
        "a": "a", "b": "b", "up": True, "kind": "thunderbolt", "host": "169.254.9.9",
        "rtt_ms": 0.4,
    }  # fmt: skip
    assert not snap["links"]["a|c"]["up"] and not snap["links"]["b|c"]["up"]
    shards = snap["instances"]["inst-1"]["shards"]
    assert [(s["node_id"], s["end_layer"] - s["start_layer"]) for s in shards] == [
        ("a", 3),
        ("b", 1),
    ]
    assert shards[1]["runner"] == "loading" and shards[1]["active_requests"] == 2
    assert shards[0]["runner"] is None  # a reported no runner for it (yet)
    assert snap["metrics"] == {"in_flight": 1}


def test_this_nodes_own_word_on_a_link_wins() -> None:
    mine = {"peer": "b", "host": "10.0.0.2", "kind": "private", "rtt": 0.002}
    theirs = {"peer": "a", "host": "10.0.0.1", "kind": "private", "rtt": 0.003}
    snap = snapshot(state(node("a", links=[mine]), node("b", links=[theirs])))
    assert snap["links"]["a|b"]["rtt_ms"] == 2.0 and snap["links"]["a|b"]["host"] == "10.0.0.2"


def test_changes_name_what_appeared_changed_and_went() -> None:
    before = snapshot(state(node("a"), node("b"), instances=[SPLIT]), {"in_flight": 0})
    failed = {**SPLIT, "state": "failed"}
    after = snapshot(state(node("a"), instances=[failed]), {"in_flight": 0})
    changes = [(c.kind, c.op, c.id) for c in diff(before, after)]
    assert changes == [
        ("cluster", "changed", None),  # b left the members
        ("node", "removed", "b"),
        ("link", "removed", "a|b"),
        ("instance", "changed", "inst-1"),
    ]
    assert diff(after, after) == []  # nothing changed, nothing sent
    first = diff(None, after)
    assert {c.op for c in first} == {"added"}
    assert diff(after, after) == []


def test_a_change_carries_what_a_script_needs() -> None:
    before = snapshot(state(node("a"), instances=[SPLIT]))
    (change,) = diff(before, snapshot(state(node("a"))))
    assert change.payload() == {"op": "removed", "id": "inst-1"}
    (change,) = diff(snapshot(state(node("a"))), before)
    assert change.payload()["value"]["model"] == "demo"


keys = st.sampled_from(["a", "b", "c", "d"])
values = st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 3), max_size=2)
snapshots = st.fixed_dictionaries(
    {
        "cluster": st.one_of(st.none(), values),
        "nodes": st.dictionaries(keys, values, max_size=4),
        "links": st.dictionaries(keys, values, max_size=4),
        "instances": st.dictionaries(keys, values, max_size=4),
        "metrics": st.one_of(st.none(), values),
    }
)


@given(snapshots, snapshots)
def test_applying_the_changes_rebuilds_the_new_snapshot(old: dict, new: dict) -> None:  # type: ignore[type-arg]
    kept = copy.deepcopy(old)
    rebuilt = apply(old, diff(old, new))
    assert old == kept  # diff and apply do not touch their inputs
    for section in ("nodes", "links", "instances"):
        assert rebuilt.get(section, {}) == new[section]
    for section in ("cluster", "metrics"):
        # A whole section never goes away: None means "not in this snapshot".
        assert rebuilt.get(section) == (new[section] if new[section] is not None else old[section])


async def test_the_publisher_wakes_streams_only_while_watched() -> None:
    """The production observer: its hooks cost a test of one integer while nobody
    watches, and wake every waiting stream when someone does."""
    import trio
    import trio.testing

    from exo_trio.publisher import Publisher

    publisher = Publisher()
    before = publisher._changed
    publisher.view_changed(None)  # type: ignore[arg-type]
    assert publisher._changed is before and not before.is_set()  # nothing to wake
    woken: list[int] = []

    async def stream(n: int) -> None:
        await publisher.next_change()
        woken.append(n)

    async with trio.open_nursery() as nursery:
        publisher.subscribers = 2
        nursery.start_soon(stream, 1)
        nursery.start_soon(stream, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        publisher.runner_state("inst-1", "ready")
    assert sorted(woken) == [1, 2]
    publisher.leave()
    publisher.leave()
    assert publisher.subscribers == 0
