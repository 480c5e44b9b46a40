"""A node's graceful shutdown: stop taking work, drain, end what is left explicitly.

On the first SIGTERM or SIGINT the node drains (`drain`):

1. It stops taking work: new requests get a 503 in their dialect and /health says
   "draining" (Node.draining); its runners take no new requests from other nodes
   (ShardManager.draining), so those are answered at once, elsewhere or with an error.
2. It waits up to the drain timeout for the HTTP exchanges in flight (the node's own
   clients, whichever node runs their tokens) and for the requests other nodes run
   on its runners to finish.
3. What is still running then ends explicitly: each local client gets its dialect's
   error event (or a 503 if nothing was sent yet), each remote request's owner gets
   a `shutting_down` failure over the link, and the runners' work is cancelled.
4. It waits (briefly) for those error events to be written and for the links to
   hand the failures to the network; then the caller cancels the node, which stops
   the runners (runner_launch.ProcessRunner.aclose) and closes the links.

A second signal during the drain stops the node at once (`graceful_stop`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import trio

from exo_trio.net.links import PeerLinks
from exo_trio.node import Node
from exo_trio.router import Router
from exo_trio.shard_manager import ShardManager

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "The node is shutting down; the request was ended before it finished."
# After the explicit errors: how long their bytes may take to reach the clients and
# the links. Writes are bounded by --send-timeout anyway; this bounds the whole stop.
FLUSH_GRACE = 2.0
POLL = 0.02


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(POLL)


async def drain(
    node: Node,
    router: Router,
    shards: ShardManager,
    links: PeerLinks[object] | None,
    drain_timeout: float,
) -> None:
    """Steps 1 to 4 above. Returns when the node may be cancelled."""
    node.draining = True
    shards.draining = True
    log.info(
        "draining: %d request(s) here, %d from other nodes; up to %gs "
        "(a second signal stops at once)",
        node.exchanges,
        len(router.peers_requests()),
        drain_timeout,
    )
    with trio.move_on_after(drain_timeout):
        await until(lambda: node.exchanges == 0 and not router.peers_requests())
    ended = node.end_all(SHUTDOWN_MESSAGE)
    remote = router.end_peers_requests("shutting_down", SHUTDOWN_MESSAGE)
    if ended or remote:
        log.warning(
            "drain timeout: ended %d request(s) here and %d from other nodes with an error",
            ended,
            remote,
        )
    with trio.move_on_after(FLUSH_GRACE):
        await until(lambda: node.exchanges == 0)
        if links is not None:
            await until(lambda: all(links.backlog(peer) == 0 for peer in links.peers()))
    log.info("drained; stopping")


async def graceful_stop(
    scope: trio.CancelScope,
    node: Node,
    router: Router,
    shards: ShardManager,
    links: PeerLinks[object] | None,
    drain_timeout: float,
) -> None:
    """Wait for SIGTERM/SIGINT, drain, then cancel `scope` (the node). A second
    signal cancels it at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            break
        async with trio.open_nursery() as nursery:

            async def second_signal() -> None:
                async for signum in signals:
                    log.warning("received %s again: stopping now", signal.Signals(signum).name)
                    scope.cancel()
                    return

            nursery.start_soon(second_signal)
            await drain(node, router, shards, links, drain_timeout)
            nursery.cancel_scope.cancel()
        scope.cancel()
