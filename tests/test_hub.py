"""Hub models: naming and planning (pure), and downloading with huggingface_hub
from a local server that speaks the hub's file API (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from exo_trio.cluster_messages import InstanceSpec, ModelInfo, ShardSpec
from exo_trio.downloads import Downloads, Want
from exo_trio.hub_download import HubClient, storage_folder
from exo_trio.hub_plan import (
    HubError,
    HubRef,
    RepoListing,
    files_for_layers,
    parse_hub_ref,
    plan_weights,
    unloadable_reason,
)
from exo_trio.model_catalog import ModelCatalog
from exo_trio.model_store import ModelStore, mlx_supports, name_for_path
from exo_trio.placement import memory_shortfall
from tests.fake_hub import FakeHub, split_weights

GIB = 2**30

# ---- pure decisions ----


def test_hub_refs_and_names() -> None:
    assert parse_hub_ref("mlx-community/Qwen3-0.6B-4bit") == HubRef("mlx-community/Qwen3-0.6B-4bit")
    assert parse_hub_ref("org/name:latest") == HubRef("org/name")
    ref = parse_hub_ref("org/name@v1.0")
    assert ref == HubRef("org/name", "v1.0") and ref.name == "org/name@v1.0"
    assert HubRef("org/name").name == "org/name"
    for bad in ("demo", "/abs/path", "org/", "a/b/c", "org/../x", "org/name@", "-x/y"):
        assert parse_hub_ref(bad) is None, bad


def test_name_for_path_uses_the_repo_id_of_a_cache_snapshot(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--name" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert name_for_path(snapshot) == "org/name"
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert name_for_path(plain) == "my-model"


def listing(*files: str, size: int = 100) -> RepoListing:
    return RepoListing("org/m", "c" * 40, {f: size for f in files})


def test_unloadable_reasons_say_what_is_wrong() -> None:
    llama = {"model_type": "llama"}
    good = listing("config.json", "model.safetensors")
    assert unloadable_reason(good, llama, mlx_supports) is None
    reason = unloadable_reason(listing("README.md"), None, mlx_supports)
    assert reason is not None and "no config.json" in reason
    reason = unloadable_reason(listing("config.json"), {"model_type": "bogus"}, mlx_supports)
    assert reason is not None and "'bogus'" in reason and "mlx-lm does not support" in reason
    reason = unloadable_reason(listing("config.json", "pytorch_model.bin"), llama, mlx_supports)
    assert reason is not None and "PyTorch .bin" in reason and "mlx-community" in reason
    reason = unloadable_reason(listing("config.json", "m-Q4.gguf"), llama, mlx_supports)
    assert reason is not None and "GGUF" in reason
    reason = unloadable_reason(
        listing("config.json", "model.safetensors"), {**llama, "model_file": "x.py"}, mlx_supports
    )
    assert reason is not None and "custom model code" in reason


def test_a_rank_fetches_its_layers_files_and_the_files_outside_layers() -> None:
    weight_map = {
        "model.embed_tokens.weight": "a.safetensors",
        "model.layers.0.mlp.weight": "a.safetensors",
        "model.layers.1.mlp.weight": "b.safetensors",
        "model.layers.2.mlp.weight": "c.safetensors",
        "model.layers.3.mlp.weight": "c.safetensors",
        "model.norm.weight": "d.safetensors",
        "lm_head.weight": "d.safetensors",
    }
    assert files_for_layers(weight_map, 0, 1) == {"a.safetensors", "d.safetensors"}
    assert files_for_layers(weight_map, 2, 4) == {"a.safetensors", "c.safetensors", "d.safetensors"}
    names = ["model-a.safetensors", "model-b.safetensors"]
    repo = listing("config.json", *names)
    index = {"weight_map": {"model.layers.0.x": names[0], "model.layers.1.x": names[1]}}
    assert plan_weights(repo, index, (1, 2)) == [names[1]]
    assert plan_weights(repo, index, None) == names
    assert plan_weights(repo, None, (1, 2)) == names  # one file, or no index: all
    broken = {"weight_map": {"model.layers.0.x": "elsewhere.safetensors"}}
    assert plan_weights(repo, broken, (0, 1)) == names


def test_memory_shortfall_counts_the_whole_cluster() -> None:
    assert memory_shortfall("m", 10 * GIB, [8 * GIB, 8 * GIB]) is None
    reason = memory_shortfall("org/big", 40 * GIB, [8 * GIB, 8 * GIB])
    assert reason is not None
    assert "org/big is too big" in reason and "40.0 GiB" in reason and "2 nodes" in reason


# ---- downloading from the local hub ----


@pytest.fixture(scope="module")
def hub(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    split = split_weights(demo_model_dir, tmp_path_factory.mktemp("split") / "m")
    with FakeHub() as server:
        server.add_model_dir("org/demo", demo_model_dir)
        server.add_model_dir("org/split", split)
        server.add_model_dir("org/tagged", demo_model_dir, **{"notes.txt": b"v1"})
        server.repos["org/tagged"].refs["v1"] = server.repos["org/tagged"].commit
        server.add_repo(
            "org/torch",
            {"config.json": b'{"model_type": "llama"}', "pytorch_model.bin": 50_000},
        )
        config = (demo_model_dir / "config.json").read_bytes()
        server.add_repo("org/huge", {"config.json": config, "model.safetensors": 10**13})
        yield server


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_local_hub_speaks_the_api_huggingface_hub_uses(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download("org/demo", cache_dir=tmp_path, endpoint=hub.url))
    for f in demo_model_dir.iterdir():
        assert sha(path / f.name) == sha(f)


def files_of(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def fits_in(free: int):  # type: ignore[no-untyped-def]
    return lambda name, size: memory_shortfall(name, size, [free])


async def fetch(client: HubClient, name: str, **kw: object):  # type: ignore[no-untyped-def]
    ref = parse_hub_ref(name)
    assert ref is not None
    downloads = Downloads(client)
    outcome: list[object] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(downloads.run)
        try:
            outcome.append(await downloads.fetch(ref, **kw))  # type: ignore[arg-type]
        except HubError as exc:
            outcome.append(exc)
        nursery.cancel_scope.cancel()
    if isinstance(outcome[0], HubError):
        raise outcome[0]
    return outcome[0]


async def test_a_download_lands_in_the_store_under_its_repo_id(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    client = HubClient(tmp_path / "hub", endpoint=hub.url)
    download = await fetch(client, "org/demo", fits=fits_in(64 * GIB))
    assert download.progress.completed == download.progress.total > 16_000_000
    (model,) = ModelStore(tmp_path, hub_cache=tmp_path / "hub").models()
    assert model.name == "org/demo" and model.complete and model.architecture == "llama"
    assert model.path == download.path
    for f in files_of(demo_model_dir):
        assert sha(model.path / f.name) == sha(f)
    # A revision other than the default branch shows in the name.
    await fetch(client, "org/tagged@v1")
    names = [m.name for m in ModelStore(tmp_path, hub_cache=tmp_path / "hub").models()]
    assert names == ["org/demo", "org/tagged@v1"]


async def test_a_model_mlx_cannot_load_or_too_big_is_refused_before_its_weights(
    hub: FakeHub, tmp_path: Path
) -> None:
    client = HubClient(tmp_path, endpoint=hub.url)
    with pytest.raises(HubError, match=r"PyTorch \.bin"):
        await fetch(client, "org/torch")
    with pytest.raises(HubError, match=r"org/huge is too big .* 9313\.2 GiB"):
        await fetch(client, "org/huge", fits=fits_in(16 * GIB))
    asked = [p for _, p, _ in hub.requests if "/org/torch/" in p or "/org/huge/" in p]
    assert {p.rsplit("/", 1)[1] for p in asked if "/resolve/" in p} == {"config.json"}
    with pytest.raises(HubError, match="no model org/missing on the hub"):
        await fetch(client, "org/missing")
    with pytest.raises(HubError, match="no revision 'nope'"):
        await fetch(client, "org/demo@nope")


async def test_an_interrupted_download_resumes_where_it_stopped(
    hub: FakeHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    client = HubClient(tmp_path, endpoint=hub.url)
    ref = HubRef("org/demo")
    # The hub sends 12 MB of the weights and then nothing: huggingface_hub writes
    # in 10 MiB chunks, so 10 MiB reach the disk; then every client goes away.
    hub.hold_after("model.safetensors", 12_000_000)
    downloads = Downloads(client)
    async with trio.open_nursery() as nursery:
        await nursery.start(downloads.run)
        download = downloads.start(ref)
        with trio.fail_after(30):
            while download.progress.done.get("model.safetensors", 0) < 10 * 2**20:
                await trio.sleep(0.05)
        downloads.leave(download)
        hub.release()  # the stalled connection ends; the cancelled thread stops
        with trio.fail_after(30):
            await download.done.wait()
        assert download.progress.state == "cancelled"
        nursery.cancel_scope.cancel()
    blobs = storage_folder(tmp_path, "org/demo") / "blobs"
    (partial,) = blobs.glob("*.incomplete")
    assert partial.stat().st_size == 10 * 2**20
    before = hub.bytes_sent.get("model.safetensors", 0)
    download = await fetch(client, "org/demo")
    assert hub.ranges("model.safetensors")[-1] == f"bytes={10 * 2**20}-"
    assert hub.bytes_sent["model.safetensors"] - before == 16_790_616 - 10 * 2**20
    assert sha(download.path / "model.safetensors") == sha(demo_model_dir / "model.safetensors")
    assert not list(blobs.glob("*.incomplete"))


async def test_a_rank_downloads_only_the_files_of_its_layers(hub: FakeHub, tmp_path: Path) -> None:
    client = HubClient(tmp_path, endpoint=hub.url)
    download = await fetch(client, "org/split", want=Want(layers=(2, 4)))
    assert download.path is not None
    have = sorted(p.name for p in download.path.glob("*.safetensors"))
    # One file of tensors outside the layers, then one file per layer (0..3).
    assert have == [
        "model-00001-of-00005.safetensors",
        "model-00004-of-00005.safetensors",
        "model-00005-of-00005.safetensors",
    ]
    (model,) = ModelStore(tmp_path, hub_cache=tmp_path).models()
    assert model.name == "org/split" and not model.complete


async def test_offline_the_cache_answers(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    online = HubClient(tmp_path, endpoint=hub.url)
    first = await fetch(online, "org/demo")
    before = len(hub.requests)
    # What HF_HUB_OFFLINE=1 in the environment sets when huggingface_hub is imported.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = HubClient(tmp_path, endpoint=hub.url)
    again = await fetch(offline, "org/demo")
    assert again.path == first.path and len(hub.requests) == before
    with pytest.raises(HubError, match=r"not in the cache .* HF_HUB_OFFLINE is set"):
        await fetch(offline, "org/split")


# ---- the catalog: describing a model for placement, fetching a shard's files ----


def split_instance(info: ModelInfo) -> InstanceSpec:
    shards = tuple(
        ShardSpec(node_id=f"n{r}", rank=r, start_layer=2 * r, end_layer=2 * r + 2, host="h", port=1)
        for r in range(2)
    )
    return InstanceSpec(
        instance_id="inst-1",
        model=info.id,
        sharding="pipeline",
        backend="ring",
        shards=shards,
        auto=False,
        info=info,
    )


async def test_a_hub_model_is_described_then_each_rank_fetches_its_share(
    hub: FakeHub, tmp_path: Path
) -> None:
    client = HubClient(tmp_path / "hub", endpoint=hub.url)
    downloads = Downloads(client)
    catalog = ModelCatalog(ModelStore(tmp_path, tmp_path / "hub"), downloads, lambda: [64 * GIB])
    seen: list[object] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(downloads.run)
        info, path = await catalog.resolve("org/split")
        # Described: config and tokenizer here, no weights fetched yet.
        assert (info.repo, info.commit) == ("org/split", hub.repos["org/split"].commit)
        assert info.n_layers == 4 and info.size_bytes > 16_000_000
        assert not [p for p in files_of(path) if p.suffix == ".safetensors"]
        spec = split_instance(info)
        path = await catalog.fetch_shard(spec, 1, seen.append)
        with pytest.raises(HubError, match="no model org/missing on the hub"):
            await catalog.resolve("org/missing")
        with pytest.raises(HubError, match="not in the store, and is not a hub model id"):
            await catalog.resolve("missing")
        # The shard's copy is partial: not offered to the leader as a model it has.
        await catalog.refresh()
        assert catalog.infos == {}
        nursery.cancel_scope.cancel()
    have = sorted(p.name for p in files_of(path) if p.suffix == ".safetensors")
    assert have == [
        "model-00001-of-00005.safetensors",
        *(f"model-0000{i}-of-00005.safetensors" for i in (4, 5)),
    ]
    assert len(seen) == 1
