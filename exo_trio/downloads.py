"""Hub downloads in flight on this node, in Trio.

`Downloads.start` starts a model's download (or joins the one already running for
it: two pulls of a model share one download) and `Downloads.leave` lets go of it;
when the last party interested in a download leaves before it is done (every
client pulling it went away), it is cancelled, its partial files kept for the next
attempt to resume. Each download runs in a worker thread (huggingface_hub blocks)
through these steps, stopping at the first that fails:

1. resolve the name to a commit and its file listing (the hub's model info, or the
   cache when offline or the hub is unreachable);
2. fetch the small files (config, tokenizer, weight index);
3. check that mlx-lm can load it and that it fits in memory (`fits`, given by the
   caller: the cluster's free memory), before a single weight byte is fetched;
4. fetch the weight files (all, or those a range of layers needs), resumably.

What is wanted (`Want`) says where to stop: only steps 1-3 to describe a model
for placement (every node that serves requests for it needs its tokenizer too),
or all of them; and a shard of a placed instance fetches exactly the commit the
instance was placed with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from exo_trio.hub_download import DownloadCancelled, DownloadProgress, HubClient
from exo_trio.hub_plan import (
    INDEX_FILE,
    HubError,
    HubRef,
    RepoListing,
    plan_weights,
    unloadable_reason,
    weights_size,
)
from exo_trio.model_store import mlx_supports

log = logging.getLogger(__name__)

# Given a model's name and weight bytes: why it cannot fit, or None.
FitCheck = Callable[[str, int], str | None]


def always_fits(name: str, size: int) -> str | None:
    return None


@dataclass(frozen=True)
class Want:
    """What of a model to fetch."""

    weights: bool = True  # False: resolve it and fetch its small files only
    layers: tuple[int, int] | None = None  # the weight files these layers need (None: all)
    commit: str | None = None  # exactly this commit, not what the revision names now


WHOLE = Want()
DESCRIBE = Want(weights=False)


@dataclass
class Download:
    ref: HubRef
    want: Want
    progress: DownloadProgress
    done: trio.Event = field(default_factory=trio.Event)
    path: Path | None = None  # the snapshot directory, once done
    listing: RepoListing | None = None
    error: HubError | None = None
    parties: int = 0

    @property
    def key(self) -> tuple[str, Want]:
        return (self.ref.name, self.want)


class Downloads:
    def __init__(self, client: HubClient) -> None:
        self.client = client
        self.active: dict[tuple[str, Want], Download] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # The node is stopping: stop the threads at their next chunk.
                for download in self.active.values():
                    download.progress.cancel()

    def start(self, ref: HubRef, fits: FitCheck = always_fits, want: Want = WHOLE) -> Download:
        """Start (or join) the download of `ref`; the caller must `leave` it."""
        key = (ref.name, want)
        download = self.active.get(key)
        if download is None:
            if self._nursery is None:
                raise RuntimeError("Downloads.run is not running")
            download = Download(ref, want, DownloadProgress(ref.name))
            self.active[key] = download
            self._nursery.start_soon(self._run, download, fits)
        download.parties += 1
        return download

    def leave(self, download: Download) -> None:
        download.parties -= 1
        if download.parties <= 0 and not download.done.is_set():
            log.info("nobody waits for %s any more: cancelling its download", download.ref.name)
            download.progress.cancel()

    async def fetch(
        self, ref: HubRef, fits: FitCheck = always_fits, want: Want = WHOLE
    ) -> Download:
        """Download `ref` and wait for it; raises HubError if it cannot be had."""
        download = self.start(ref, fits, want)
        try:
            await download.done.wait()
        finally:
            self.leave(download)
        if download.error is not None:
            raise download.error
        return download

    def in_flight(self) -> list[DownloadProgress]:
        """The downloads of weights under way (describing a model is quick)."""
        return [d.progress for d in self.active.values() if d.want.weights]

    async def _run(self, download: Download, fits: FitCheck) -> None:
        progress = download.progress
        try:
            # abandon_on_cancel: a stopping node does not wait for a chunk to end;
            # the cancelled progress stops the thread at its next chunk.
            await trio.to_thread.run_sync(self._work, download, fits, abandon_on_cancel=True)
            progress.end("done")
            if download.want.weights:
                log.info("%s is in the store (%s)", download.ref.name, download.path)
        except DownloadCancelled as exc:
            download.error = HubError(str(exc), 503)
            progress.end("cancelled", str(exc))
        except HubError as exc:
            download.error = exc
            progress.end("failed", str(exc))
            log.warning("cannot fetch %s: %s", download.ref.name, exc)
        except Exception as exc:  # a network or disk error in huggingface_hub
            download.error = HubError(f"downloading {download.ref.name} failed: {exc}", 502)
            progress.end("failed", str(download.error))
            log.warning("%s", download.error, exc_info=exc)
        finally:
            if self.active.get(download.key) is download:
                del self.active[download.key]
            download.done.set()

    def _work(self, download: Download, fits: FitCheck) -> None:
        """In a worker thread: the steps of the module docstring."""
        client, ref, want, progress = self.client, download.ref, download.want, download.progress
        listing = client.listing(HubRef(ref.repo, want.commit) if want.commit else ref)
        download.listing = listing
        download.path = client.fetch_small(listing, progress)
        reason = unloadable_reason(listing, client.read_json(listing, "config.json"), mlx_supports)
        if reason is None:
            reason = trio.from_thread.run_sync(fits, ref.name, weights_size(listing))
        if reason is not None:
            raise HubError(reason)
        if want.weights:
            names = plan_weights(listing, client.read_json(listing, INDEX_FILE), want.layers)
            client.fetch_weights(listing, names, progress)
        client.remember_revision(ref, listing.commit)
