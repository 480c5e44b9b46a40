"""Fetching hub models with huggingface_hub into a Hugging Face cache directory.

The thin imperative shell around hub_plan.py. Everything goes through
huggingface_hub, so `HF_ENDPOINT` (a mirror, or the test suite's local hub),
`HF_TOKEN` and `HF_HUB_OFFLINE` mean what they mean to every other HF tool, and
the files land in the standard cache layout (`models--ORG--NAME/blobs`, `refs`,
`snapshots/COMMIT/…`), where mlx-lm, transformers and `hf` find them too.

Resuming: huggingface_hub resumes a file within one call (it retries a cut
connection with a Range request) but deletes the partial file when the call fails,
so a node stopped halfway through a 5 GB weight file would start it again. Weight
files are therefore fetched here into `blobs/ETAG.incomplete`, which survives a
restart, with huggingface_hub's own `http_get` asked to resume from its length (a
Range request); the finished blob is then linked into the snapshot by
`hf_hub_download`, which finds it in place. The small files go through
`hf_hub_download` directly.

All calls here block: the node runs them in a thread (`trio.to_thread`), and
stops one by cancelling its DownloadProgress (the next chunk raises).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from exo_trio.hub_plan import (
    HubError,
    HubRef,
    RepoListing,
    small_files,
)

log = logging.getLogger(__name__)

DownloadState = Literal["resolving", "downloading", "done", "failed", "cancelled"]
# Weight files fetched at once (huggingface_hub's snapshot_download uses 8).
PARALLEL_FILES = 4


class DownloadCancelled(Exception):
    """The download was cancelled (a DELETE, the node stopping); partial files stay
    and the next download resumes them."""


@dataclass
class DownloadProgress:
    """One model's download, written by the download threads and read by the API
    (/state, /v1/models, /api/pull): plain numbers, consistent enough to display."""

    model: str
    state: DownloadState = "resolving"
    files: dict[str, int] = field(default_factory=dict)  # path -> total bytes
    done: dict[str, int] = field(default_factory=dict)  # path -> bytes on disk
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def total(self) -> int:
        return sum(self.files.values())

    @property
    def completed(self) -> int:
        return sum(min(self.done.get(f, 0), size) for f, size in self.files.items())

    def plan(self, files: dict[str, int]) -> None:
        self.files.update(files)
        self.state = "downloading"

    def advance(self, path: str, n: int) -> None:
        if self._cancelled.is_set():
            raise DownloadCancelled(f"download of {self.model} cancelled")
        self.done[path] = self.done.get(path, 0) + n

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def end(self, state: DownloadState, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.finished.set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "state": self.state,
            "completed": self.completed,
            "total": self.total,
            "files": len(self.files),
            "error": self.error,
        }


def _progress_bar_for(progress: DownloadProgress, path: str) -> type:
    """A tqdm stand-in for huggingface_hub's http_get that feeds `progress`."""

    class Bar:
        def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
            progress.done[path] = initial

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            progress.advance(path, int(n or 0))

        def close(self) -> None:
            return None

    return Bar


def storage_folder(cache_dir: Path, repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir / repo_folder_name(repo_id=repo, repo_type="model")


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _explain(exc: Exception, ref: HubRef) -> HubError:
    """A huggingface_hub error as a sentence a user can act on."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"{ref.repo} is gated: accept its terms on the hub and set HF_TOKEN", 403)
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"{ref.repo} has no revision {ref.revision!r}", 404)
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"no model {ref.repo} on the hub (or it is private: set HF_TOKEN)", 404)
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return HubError(f"{ref.name} is not in the cache and HF_HUB_OFFLINE is set", 404)
    return HubError(f"fetching {ref.name} failed: {type(exc).__name__}: {exc}", 502)


@dataclass
class HubClient:
    """huggingface_hub pointed at one cache directory (and the environment's
    endpoint, token and offline switch)."""

    cache_dir: Path
    # None: HF_ENDPOINT (or the hub) and HF_HUB_OFFLINE, as every HF tool reads them.
    endpoint: str | None = None
    offline: bool | None = None

    @property
    def is_offline(self) -> bool:
        return is_offline() if self.offline is None else self.offline

    def listing(self, ref: HubRef) -> RepoListing:
        """The repo's files and sizes at the revision: from the hub's model info,
        or, offline (or the hub unreachable), from the cached snapshot."""
        import httpx2
        from huggingface_hub import HfApi, errors

        if self.is_offline:
            return self.cached_listing(ref)
        try:
            info = HfApi(endpoint=self.endpoint).model_info(
                ref.repo, revision=ref.revision, files_metadata=True
            )
        except (httpx2.ConnectError, httpx2.TimeoutException, errors.OfflineModeIsEnabled) as exc:
            log.warning("hub unreachable (%s): looking for %s in the cache", exc, ref.name)
            try:
                return self.cached_listing(ref)
            except HubError:
                raise HubError(
                    f"the hub is out of reach ({exc}) and {ref.name} is not in the cache", 503
                ) from exc
        except errors.HfHubHTTPError as exc:
            raise _explain(exc, ref) from exc
        if not info.sha:
            raise HubError(f"the hub gave no commit for {ref.name}", 502)
        files = {s.rfilename: int(s.size or 0) for s in info.siblings or ()}
        return RepoListing(ref.repo, info.sha, files)

    def cached_commit(self, ref: HubRef) -> str | None:
        folder = storage_folder(self.cache_dir, ref.repo)
        if (folder / "snapshots" / ref.revision).is_dir():
            return ref.revision  # a commit hash
        try:
            return (folder / "refs" / ref.revision).read_text().strip() or None
        except OSError:
            return None

    def snapshot_dir(self, repo: str, commit: str) -> Path:
        return storage_folder(self.cache_dir, repo) / "snapshots" / commit

    def cached_listing(self, ref: HubRef) -> RepoListing:
        commit = self.cached_commit(ref)
        snapshot = self.snapshot_dir(ref.repo, commit) if commit else None
        if commit is None or snapshot is None or not snapshot.is_dir():
            where = "HF_HUB_OFFLINE is set" if self.is_offline else "the hub is unreachable"
            raise HubError(f"{ref.name} is not in the cache at {self.cache_dir} and {where}", 404)
        files = {
            p.relative_to(snapshot).as_posix(): p.stat().st_size
            for p in snapshot.rglob("*")
            if p.is_file()
        }
        return RepoListing(ref.repo, commit, files)

    def fetch_small(self, listing: RepoListing, progress: DownloadProgress) -> Path:
        """Fetch the config, tokenizer and index files; returns the snapshot dir."""
        from huggingface_hub import hf_hub_download

        names = small_files(listing)
        progress.plan({f: listing.files[f] for f in names})
        for name in names:
            if progress.cancelled:
                raise DownloadCancelled(f"download of {progress.model} cancelled")
            if not self._cached(listing, name):
                hf_hub_download(
                    listing.repo,
                    name,
                    revision=listing.commit,
                    cache_dir=self.cache_dir,
                    endpoint=self.endpoint,
                    tqdm_class=_progress_bar_for(progress, name),
                )
            progress.done[name] = listing.files[name]
        return self.snapshot_dir(listing.repo, listing.commit)

    def fetch_weights(
        self, listing: RepoListing, names: Iterable[str], progress: DownloadProgress
    ) -> None:
        names = sorted(names)
        progress.plan({f: listing.files[f] for f in names})
        todo = [n for n in names if not self._cached(listing, n)]
        for name in names:
            if name not in todo:
                progress.done[name] = listing.files[name]
        if not todo:
            return
        with ThreadPoolExecutor(PARALLEL_FILES, thread_name_prefix="hub") as pool:
            # list(): re-raise the first failure (the others run to their end).
            list(pool.map(lambda n: self._fetch_weight(listing, n, progress), todo))

    def remember_revision(self, ref: HubRef, commit: str) -> None:
        """refs/REVISION -> COMMIT, as huggingface_hub writes it, so the name resolves
        offline too."""
        if ref.revision == commit:
            return
        path = storage_folder(self.cache_dir, ref.repo) / "refs" / ref.revision
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, path)

    def read_json(self, listing: RepoListing, name: str) -> dict[str, Any] | None:
        path = self.snapshot_dir(listing.repo, listing.commit) / name
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise HubError(f"{listing.repo}: cannot read {name}: {exc}") from exc
        return value if isinstance(value, dict) else None

    # ---- one weight file, resumably ----

    def _cached(self, listing: RepoListing, name: str) -> bool:
        return (self.snapshot_dir(listing.repo, listing.commit) / name).is_file()

    def _fetch_weight(self, listing: RepoListing, name: str, progress: DownloadProgress) -> None:
        from filelock import FileLock, Timeout
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(listing.repo, name, revision=listing.commit, endpoint=self.endpoint)
        headers = build_hf_headers()
        meta = get_hf_file_metadata(url, headers=headers, endpoint=self.endpoint)
        if meta.etag is None:
            raise HubError(f"{listing.repo}/{name}: the hub sent no ETag")
        folder = storage_folder(self.cache_dir, listing.repo)
        blob = folder / "blobs" / meta.etag
        size = meta.size if meta.size is not None else listing.files[name]
        progress.files[name] = size
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            # The same lock file huggingface_hub takes for this blob, so that nodes
            # (or other HF tools) sharing the cache never write it together.
            lock_path = self.cache_dir / ".locks" / folder.name / f"{meta.etag}.lock"
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(lock_path))
            while True:
                try:
                    lock.acquire(timeout=1)
                    break
                except Timeout:
                    progress.advance(name, 0)  # raises if cancelled meanwhile
            try:
                if not blob.exists():
                    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
                        # A signed CDN address: the hub's token must not go there.
                        headers.pop("authorization", None)
                    self._download_blob(meta.location, headers, blob, size, name, progress)
            finally:
                lock.release()
        progress.done[name] = size
        # The blob is in place: hf_hub_download only links it into the snapshot.
        hf_hub_download(
            listing.repo,
            name,
            revision=listing.commit,
            cache_dir=self.cache_dir,
            endpoint=self.endpoint,
        )

    @staticmethod
    def _download_blob(
        url: str,
        headers: dict[str, str],
        blob: Path,
        size: int,
        name: str,
        progress: DownloadProgress,
    ) -> None:
        from huggingface_hub.file_download import http_get

        partial = blob.with_name(blob.name + ".incomplete")
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            have = 0
            partial.unlink()
        if have:
            log.info("resuming %s at %d of %d bytes", name, have, size)
        with partial.open("ab") as f:
            http_get(
                url,
                f,
                resume_size=have,
                headers=headers,
                expected_size=size,
                tqdm_class=_progress_bar_for(progress, name),
            )
        os.replace(partial, blob)
