"""What a node knows about models: its store on disk, the models it was started
with, the downloads in flight, and how much memory the cluster has to run them in.

- The leader places models by what the nodes report (`infos`: every complete model
  in the store and every model the node was started with; a hub model's entry
  carries its repo and commit, so a node that lacks it can fetch it).
- A model asked for by name (`POST /v1/instances`, Ollama's load on demand) is
  `resolve`d: found locally, or described from the hub (its small files fetched,
  checked as loadable and as fitting the cluster's memory, no weights yet).
- A shard of a placed instance gets its files with `fetch_shard`: the local copy,
  or the weight files its layers need, fetched at the instance's commit.
- Every node serves requests for every model placed in the cluster, wherever it
  runs, so it needs each one's tokenizer and context length (`cards`, kept up to
  date by `run` from the instances the cluster has: a hub model's small files are
  fetched for it; a directory only another node has cannot be, and requests for
  that model must go to a node that has it).
- The API's model management (Ollama's /api/pull, /api/delete, /api/tags, the CLI's
  `pull`, `ls`, `rm`) works on the store and `pull`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from exo_trio.cluster_messages import InstanceSpec, ModelInfo
from exo_trio.downloads import DESCRIBE, Download, Downloads, Want, always_fits
from exo_trio.hub_download import DownloadProgress
from exo_trio.hub_plan import HubError, HubRef, parse_hub_ref, weights_size
from exo_trio.model_info import describe_model_dir, model_info
from exo_trio.model_store import ModelStore, StoredModel, has_all_weights
from exo_trio.node import ModelCard, ServedModel
from exo_trio.placement import memory_shortfall
from exo_trio.prompts import HFPromptEncoder, context_length

log = logging.getLogger(__name__)

# How often `run` looks at the cluster's instances for models it has no card for.
WATCH_INTERVAL = 0.25


@dataclass
class ModelCatalog:
    store: ModelStore
    downloads: Downloads
    # The free memory of every node of the cluster (bytes), this node's first.
    cluster_memory: Callable[[], list[int]]
    # Models the node was started with (--model): name -> (info, directory).
    pinned: dict[str, tuple[ModelInfo, Path]] = field(default_factory=dict)
    # What the node reports to the leader, kept up to date by `refresh` (the
    # cluster holds this very dict).
    infos: dict[str, ModelInfo] = field(default_factory=dict)
    # Tokenizer and facts of every model placed in the cluster (see `run`).
    cards: dict[str, ServedModel] = field(default_factory=dict)
    # Why a placed model has no card here (instance id -> reason).
    card_errors: dict[str, str] = field(default_factory=dict)
    _paths: dict[str, Path] = field(default_factory=dict)
    _shard_paths: dict[str, Path] = field(default_factory=dict)  # instance id -> dir

    # ---- what this node has ----

    def pin(self, info: ModelInfo, path: Path) -> None:
        """A model the node was started with; `path` holds at least its config and
        tokenizer (a hub model's weights come when it is placed)."""
        self.pinned[info.id] = (info, path)
        self.infos[info.id] = info
        if has_all_weights(path):
            self._paths[info.id] = path

    async def refresh(self) -> None:
        """Read the store again (at start, and after a pull, a delete or a shard's
        download): every complete model in it, and the pinned ones, go into
        `infos`. The disk is read in a thread; the dicts change here, in Trio."""
        found = await trio.to_thread.run_sync(self.scan)
        for name, (info, path) in self.pinned.items():
            found[name] = (info, path, has_all_weights(path))
        self.infos.clear()
        self.infos.update({name: info for name, (info, _, _) in found.items()})
        self._paths = {name: path for name, (_, path, whole) in found.items() if whole}

    def scan(self) -> dict[str, tuple[ModelInfo, Path, bool]]:
        """The complete models in the store (blocking: reads the disk)."""
        found = {}
        for model in self.store.models():
            if model.complete:
                try:
                    found[model.name] = (stored_info(model), model.path, True)
                except (OSError, ValueError) as exc:
                    log.warning("skipping %s in the store: %s", model.name, exc)
        return found

    def local_path(self, name: str) -> Path | None:
        """The directory holding all of a model, if this node has one."""
        return self._paths.get(name)

    # ---- finding a model by name ----

    def fits(self, name: str, size_bytes: int) -> str | None:
        return memory_shortfall(name, size_bytes, self.cluster_memory())

    async def resolve(self, name: str, check_memory: bool = True) -> tuple[ModelInfo, Path]:
        """A model's placement facts and a directory holding at least its config and
        tokenizer: a local one, or a hub model described from the hub (HubError
        with the reason, as 404 or 400, when it cannot be: not MLX-loadable, or,
        with `check_memory`, too big for the cluster's memory)."""
        name = name.removesuffix(":latest")
        if name in self.infos:
            return self.infos[name], self._paths[name]
        ref = parse_hub_ref(name)
        if ref is None:
            raise HubError(
                f"model {name!r} is not in the store, and is not a hub model id "
                "(org/name or org/name@revision)",
                404,
            )
        fits = self.fits if check_memory else always_fits
        download = await self.downloads.fetch(ref, fits, DESCRIBE)
        assert download.path is not None and download.listing is not None
        listing = download.listing
        info = await trio.to_thread.run_sync(
            lambda: model_info(
                download.path,  # type: ignore[arg-type]
                ref.name,
                size_bytes=weights_size(listing),
                repo=ref.repo,
                commit=listing.commit,
            )
        )
        return info, download.path

    # ---- a shard's files ----

    def model_dir(self, spec: InstanceSpec) -> Path:
        """Where this node's shard of an instance loads its model from (after
        `fetch_shard`)."""
        path = self._shard_paths.get(spec.instance_id) or self.local_path(spec.model)
        if path is None:
            raise HubError(f"this node does not have model {spec.model}", 404)
        return path

    async def fetch_shard(
        self, spec: InstanceSpec, rank: int, watch: Callable[[DownloadProgress], None]
    ) -> Path:
        """The directory a shard's runner loads: this node's copy of the model, or
        the files the shard's layers need, fetched from the hub at the instance's
        commit (`watch` is handed the progress to report)."""
        local = self.local_path(spec.model)
        if local is not None:
            return local
        info = spec.info
        if info is None or info.repo is None or info.commit is None:
            raise HubError(f"this node does not have model {spec.model}", 404)
        ref = shard_ref(spec.model, info)
        download = self.downloads.start(ref, always_fits, shard_want(spec, rank))
        watch(download.progress)
        try:
            await download.done.wait()
        finally:
            self.downloads.leave(download)
        if download.error is not None:
            raise download.error
        assert download.path is not None
        self._shard_paths[spec.instance_id] = download.path
        await self.refresh()  # a whole model is in the store now
        return download.path

    # ---- the cards of the models placed in the cluster ----

    async def run(
        self,
        placed: Callable[[], Iterable[InstanceSpec]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a card for every model `placed` (the cluster's live instances)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            preparing: set[str] = set()
            while True:
                for spec in placed():
                    name = spec.model
                    if name in self.cards or name in preparing or name in self.pinned:
                        continue  # (the node has the pinned ones' cards already)
                    if spec.instance_id in self.card_errors:
                        continue  # tried for this instance; a new one tries again
                    preparing.add(name)
                    nursery.start_soon(self._prepare_card, spec, preparing)
                await trio.sleep(WATCH_INTERVAL)

    async def _prepare_card(self, spec: InstanceSpec, preparing: set[str]) -> None:
        name = spec.model
        try:
            path = self._shard_paths.get(spec.instance_id) or self.local_path(name)
            info = spec.info
            if path is None and info is not None and info.repo is not None:
                download = await self.downloads.fetch(
                    shard_ref(name, info), always_fits, Want(weights=False, commit=info.commit)
                )
                path = download.path
            if path is None:
                raise HubError(
                    f"model {name} runs on another node and this node does not have its "
                    "files: send its requests to a node that has them"
                )
            card_path = path
            self.cards[name] = await trio.to_thread.run_sync(
                lambda: served_model(name, card_path, info)
            )
            log.info("serving requests for %s", name)
        except Exception as exc:
            self.card_errors[spec.instance_id] = str(exc)
            log.warning("cannot serve requests for %s: %s", name, exc)
        finally:
            preparing.discard(name)

    # ---- the store, for the API ----

    def pull(self, ref: HubRef) -> Download:
        """Start (or join) downloading a hub model into the store; `leave` it after."""
        return self.downloads.start(ref, self.fits)

    def downloads_in_flight(self) -> list[dict[str, Any]]:
        return [p.snapshot() for p in self.downloads.in_flight()]


def served_model(name: str, path: Path, info: ModelInfo | None) -> ServedModel:
    """The card and tokenizer of a model, from a directory holding at least its
    config and tokenizer files."""
    facts = describe_model_dir(path)
    card = ModelCard(
        id=name,
        context_length=context_length(path),
        created=int(time.time()),
        architecture=facts.architecture,
        size_bytes=info.size_bytes if info is not None else facts.size_bytes,
        digest=facts.digest,
        vocab_size=facts.vocab_size,
    )
    return ServedModel(card, HFPromptEncoder(path))


def shard_ref(name: str, info: ModelInfo) -> HubRef:
    """The hub name a shard fetches a placed model under: the served name's
    revision when the name is the repo's (so the store names it alike), else the
    commit itself."""
    assert info.repo is not None and info.commit is not None
    ref = parse_hub_ref(name)
    if ref is not None and ref.repo == info.repo:
        return ref
    return HubRef(info.repo, info.commit)


def shard_want(spec: InstanceSpec, rank: int) -> Want:
    """A pipeline rank fetches the files of its layers; a tensor-parallel rank (a
    slice of every layer) or a whole model, all of them. Always the instance's
    commit, whatever the branch names now."""
    assert spec.info is not None
    shard = spec.shards[rank]
    layers = None
    if spec.sharding == "pipeline" and spec.world_size > 1:
        layers = (shard.start_layer, shard.end_layer)
    return Want(layers=layers, commit=spec.info.commit)


def stored_info(model: StoredModel) -> ModelInfo:
    return model_info(model.path, model.name, repo=model.repo, commit=model.commit)


def digest(model: StoredModel) -> str:
    """A stable digest naming the model's content: the commit for a hub model, the
    config and weight files' names and sizes for a directory."""
    if model.repo is not None:
        return "sha256:" + hashlib.sha256(f"{model.repo}@{model.commit}".encode()).hexdigest()
    return describe_model_dir(model.path).digest


def stored_entry(model: StoredModel) -> dict[str, Any]:
    """A store model as the CLI's `ls` and /state show it."""
    return {
        "name": model.name,
        "repo": model.repo,
        "commit": model.commit,
        "path": str(model.path),
        "size": model.size_bytes,
        "complete": model.complete,
        "modified": model.modified,
        "architecture": model.architecture,
    }
