"""The node's change publisher: the production observer, which wakes the event
streams (GET /v1/events, api/events.py).

The node tells its observer (observer.py) what happens as it happens: links up
and down, leadership, views, shards and their runners. This observer only turns
that into "something may have changed": each event stream waits in
`next_change`, then takes a snapshot of its own and sends what differs. `poke` is
synchronous, never blocks, and does nothing while nobody subscribes, so the node
pays nothing for an unwatched stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from exo_trio.observer import Observer

if TYPE_CHECKING:
    from exo_trio.cluster_messages import ClusterView, InstanceSpec


class Publisher(Observer):
    def __init__(self) -> None:
        self.subscribers = 0
        self._changed = trio.Event()

    def leave(self) -> None:
        """An event stream ended (its HTTP exchange did)."""
        self.subscribers -= 1

    def poke(self) -> None:
        """Something may have changed: wake every stream that waits."""
        if self.subscribers:
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    async def next_change(self) -> None:
        """Return at the next poke."""
        await self._changed.wait()

    # ---- the observer's hooks that change what a snapshot shows ----

    def peer_up(self, peer: str) -> None:
        self.poke()

    def peer_down(self, peer: str, reason: str) -> None:
        self.poke()

    def leader_changed(self, old: str, new: str, term: int) -> None:
        self.poke()

    def view_changed(self, view: ClusterView) -> None:
        self.poke()

    def shard_started(self, instance: InstanceSpec, rank: int) -> None:
        self.poke()

    def shard_stopped(self, instance_id: str, reason: str) -> None:
        self.poke()

    def runner_state(self, instance_id: str, state: str) -> None:
        self.poke()
