"""One rank's share of a model split across an `mx.distributed` group.

The runners of one instance (one process per node) join one group and each
keeps only its part of the model:

* **pipeline**: each rank holds a contiguous range of decoder layers. The ranks
  form a chain in layer order; a rank receives the hidden state from the rank
  holding the layers before its own, runs its layers, and sends the result on.
  Finally every rank takes the last stage's hidden state (with two ranks the
  last stage sends it to the other one; with more, an `all_gather`), so every
  rank computes the same logits and samples the same tokens (the pattern of
  mlx-lm's `deepseek_v3` `pipeline()`).
* **tensor**: every rank holds every layer but a slice of each attention and MLP
  projection, via the model's own mlx-lm `shard(group)`.

Pipeline splitting works for any mlx-lm model whose layers are a list
(`model.layers`): the list is cut down to the local range, so other layers'
weights are never read from disk, and the first and last local layers get a
class with a `__call__` shim around the original one that does the
receive / send / gather. The model's own forward pass and mlx-lm's cache
creation keep working unchanged; caches exist only for local layers.

Everything here runs before the model's weights are materialised, on a model
loaded with `mlx_lm.load(..., lazy=True)`.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, _BaseCache

__all__ = [
    "Backend",
    "PipelineStage",
    "ShardSpec",
    "Sharding",
    "ShardingError",
    "agree_on_layout",
    "apply_sharding",
    "even_split",
    "join_group",
    "parse_layers",
    "ranks_share_host",
]

log = logging.getLogger(__name__)

Backend = Literal["ring", "jaccl"]
Sharding = Literal["pipeline", "tensor"]
_SHARDING_CODES: dict[str, int] = {"pipeline": 1, "tensor": 2}


class ShardingError(Exception):
    """The group or the model cannot be set up as asked; the message says why."""


@dataclass(frozen=True)
class ShardSpec:
    """How this runner takes part in a distributed instance (from the CLI)."""

    rank: int
    world_size: int
    backend: Backend
    sharding: Sharding
    layers: tuple[int, int] | None  # [start, end); None: an even split by rank
    hostfile: Path | None = None  # ring: JSON [[host:port, ...], ...] in rank order
    ibv_devices: Path | None = None  # jaccl: the RDMA device matrix file
    jaccl_coordinator: str | None = None  # jaccl: rank 0's host:port


@dataclass(frozen=True)
class PipelineStage:
    """Where this rank sits in the layer chain (ranks, not stage numbers)."""

    start: int
    end: int
    prev_rank: int | None  # receives its input from this rank; None: the first stage
    next_rank: int | None  # sends its output to this rank; None: the last stage
    last_rank: int  # the rank holding the final layers, whose output everyone takes


def parse_layers(text: str) -> tuple[int, int]:
    """'START:END' (half open, 0-based) -> (start, end)."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"layers must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"layers {text!r}: need 0 <= START < END")
    return start, end


def even_split(n_layers: int, world_size: int, rank: int) -> tuple[int, int]:
    """The default pipeline range: contiguous, in rank order, low ranks get extras."""
    base, extra = divmod(n_layers, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# -- joining the group ------------------------------------------------------------------


def join_group(spec: ShardSpec) -> mx.distributed.Group:
    """Join the instance's group. Blocks until every rank has joined.

    The ring backend's accepting side waits forever for a peer that never comes,
    so the caller must bound this with a watchdog; a connecting side gives up
    after about 30 s, and we simply try again (the peer may be slow to start).
    """
    if spec.backend == "ring":
        if spec.hostfile is None:
            raise ShardingError("the ring backend needs --hostfile")
        _check_hostfile(spec.hostfile, spec.world_size)
        os.environ["MLX_HOSTFILE"] = str(spec.hostfile)
    elif spec.backend == "jaccl":
        if spec.ibv_devices is None or spec.jaccl_coordinator is None:
            raise ShardingError("the jaccl backend needs --ibv-devices and --jaccl-coordinator")
        os.environ["MLX_IBV_DEVICES"] = str(spec.ibv_devices)
        os.environ["MLX_JACCL_COORDINATOR"] = spec.jaccl_coordinator
    else:
        raise ShardingError(f"unknown backend {spec.backend!r}")
    os.environ["MLX_RANK"] = str(spec.rank)
    if not mx.distributed.is_available(spec.backend):
        raise ShardingError(f"the {spec.backend} backend is not available in this MLX build")
    while True:
        before = _thread_ids()
        try:
            group = mx.distributed.init(strict=True, backend=spec.backend)
            _calm_comm_threads(_thread_ids() - before, spec)
            break
        except RuntimeError as exc:
            if "connect" not in str(exc).lower():
                raise ShardingError(f"joining the {spec.backend} group failed: {exc}") from exc
            log.warning("joining the group: %s; trying again", exc)
    if (group.rank(), group.size()) != (spec.rank, spec.world_size):
        raise ShardingError(
            f"joined as rank {group.rank()} of {group.size()}, "
            f"expected rank {spec.rank} of {spec.world_size}"
        )
    return group


# MLX's ring backend moves bytes in threads of its own (one per socket, created by
# `mx.distributed.init`) that busy-wait while a transfer is pending: inside a
# forward pass a rank spins for as long as it waits for another rank's activations.
# When ranks share a machine's cores, that spinning competes with the very
# computation it waits for; at nice 19 such a thread only gets a core that nothing
# else of ours (this rank's compute, the node, the other rank) wants. Measured on
# this project's 2-core machine, 2 ranks on loopback: 15-25% less CPU per token,
# and more tokens/s, pipeline and tensor. Ranks on machines of their own keep
# MLX's defaults: there a spinning thread takes a core that would otherwise idle
# (not measured: this project has no multi-machine rig). Linux only: elsewhere
# there is no per-thread nice. EXO_TRIO_COMM_NICE=N forces nice N (0: leave them
# alone).
COMM_THREAD_NICE = 19


def _thread_ids() -> set[int]:
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:  # not Linux
        return set()


def _calm_comm_threads(tids: set[int], spec: ShardSpec) -> None:
    """Lower the priority of the socket threads `mx.distributed.init` started (see
    above); `tids` are all the threads it started."""
    forced = os.environ.get("EXO_TRIO_COMM_NICE", "")
    if forced.strip():
        nice = int(forced)
    else:
        nice = COMM_THREAD_NICE if ranks_share_host(spec) else 0
    if not nice:
        return
    # The ring starts a worker pool first, then one socket thread per socket, as many
    # as pool threads: the newer half are the socket threads (thread ids grow). Only
    # those spin; the pool threads do the all_sum arithmetic of tensor parallelism,
    # and at nice 19 they would wait behind the spinners (measured: tensor parallel
    # at half the speed).
    ordered = sorted(tids)
    if len(ordered) % 2:
        log.debug("unexpected MLX threads %s: leaving them alone", ordered)
        return
    sockets = ordered[len(ordered) // 2 :]
    for tid in sockets:
        try:
            # On Linux PRIO_PROCESS with a thread id sets that one thread's nice.
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as exc:  # gone already, or not permitted: only a missed optimisation
            log.debug("cannot renice MLX thread %d: %s", tid, exc)
    log.debug("MLX socket threads %s at nice %d", sockets, nice)


def ranks_share_host(spec: ShardSpec) -> bool:
    """Whether another rank of the instance runs on this rank's machine (as far as the
    hostfile tells): then the ranks compete for the same cores."""
    if spec.backend != "ring" or spec.hostfile is None:
        return False  # JACCL links separate machines
    try:
        hosts = [
            str(entries[0]).rpartition(":")[0].strip("[]")
            for entries in json.loads(spec.hostfile.read_text())
        ]
    except (OSError, ValueError, IndexError, TypeError):
        return False
    if not 0 <= spec.rank < len(hosts):
        return False
    mine = hosts[spec.rank]
    if mine == "localhost":
        return True
    try:
        if ipaddress.ip_address(mine).is_loopback:
            return True
    except ValueError:
        pass
    return hosts.count(mine) > 1


def _check_hostfile(path: Path, world_size: int) -> None:
    try:
        hosts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardingError(f"cannot read hostfile {path}: {exc}") from exc
    if not (isinstance(hosts, list) and all(isinstance(h, list) and h for h in hosts)):
        raise ShardingError(f"hostfile {path} must be a JSON list of [host:port, ...] lists")
    if len(hosts) != world_size:
        raise ShardingError(
            f"hostfile {path} lists {len(hosts)} ranks but --world-size is {world_size}"
        )


# -- agreeing on the layout -------------------------------------------------------------


def agree_on_layout(
    group: mx.distributed.Group, spec: ShardSpec, n_layers: int
) -> PipelineStage | None:
    """Check, with every rank, that the ranks describe one consistent split.

    Each rank contributes (sharding, start, end, n_layers); all ranks see the
    same table and reach the same verdict, so a misconfigured instance fails on
    every rank with the same clear message instead of deadlocking later.
    Returns this rank's stage for pipeline sharding, None for tensor.
    """
    start, end = spec.layers if spec.layers is not None else (0, n_layers)
    if spec.sharding == "pipeline" and spec.layers is None:
        start, end = even_split(n_layers, spec.world_size, spec.rank)
    mine = mx.array([_SHARDING_CODES[spec.sharding], start, end, n_layers], dtype=mx.int32)
    table = mx.distributed.all_gather(mine, group=group).reshape(spec.world_size, 4).tolist()
    problem = _layout_problem(table, spec.backend)
    if problem is not None:
        raise ShardingError(f"inconsistent instance layout: {problem}")
    if spec.sharding == "tensor":
        return None
    order = sorted(range(spec.world_size), key=lambda r: table[r][1])
    position = order.index(spec.rank)
    return PipelineStage(
        start=start,
        end=end,
        prev_rank=order[position - 1] if position > 0 else None,
        next_rank=order[position + 1] if position + 1 < len(order) else None,
        last_rank=order[-1],
    )


def _layout_problem(table: list[list[int]], backend: str) -> str | None:
    """What is wrong with the gathered (sharding, start, end, n_layers) rows, if anything."""
    size = len(table)
    if len({row[0] for row in table}) != 1:
        return f"ranks disagree on the sharding: {[row[0] for row in table]}"
    if len({row[3] for row in table}) != 1:
        return f"ranks loaded models with different layer counts: {[row[3] for row in table]}"
    n_layers = table[0][3]
    ranges = [(row[1], row[2]) for row in table]
    if table[0][0] == _SHARDING_CODES["tensor"]:
        if any(r != (0, n_layers) for r in ranges):
            return f"tensor sharding needs every rank to hold layers 0:{n_layers}, got {ranges}"
        return None
    order = sorted(range(size), key=lambda r: ranges[r][0])
    expected = 0
    for r in order:
        start, end = ranges[r]
        if start != expected or end <= start:
            return f"layer ranges {ranges} (by rank) do not tile 0:{n_layers}"
        expected = end
    if expected != n_layers:
        return f"layer ranges {ranges} (by rank) do not tile 0:{n_layers}"
    if backend == "ring":
        # The ring backend sends only to a rank's two ring neighbours.
        for a, b in itertools.pairwise(order):
            if (a - b) % size not in (1, size - 1):
                return (
                    f"layer ranges {ranges}: consecutive stages on ranks {a} and {b}, "
                    "which are not ring neighbours"
                )
    return None


# -- cutting the model ------------------------------------------------------------------


def apply_sharding(
    model: nn.Module,
    config: dict[str, Any],
    group: mx.distributed.Group,
    spec: ShardSpec,
) -> nn.Module:
    """Cut a lazily loaded model down to this rank's share, in place."""
    layers = _layer_list(model)
    stage = agree_on_layout(group, spec, len(layers))
    if stage is None:
        _shard_tensor(model, config, group)
    else:
        _pipeline(model, layers, stage, group)
    # Shapes and dtypes are known without reading anything: this is what the rank
    # will materialise.
    nbytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    log.info("rank %d holds %.1f MB of weights", group.rank(), nbytes / 1e6)
    return model


def _layer_list(model: nn.Module) -> list[Any]:
    layers = getattr(model, "layers", None)
    if layers is None and isinstance(model.get("model"), nn.Module):
        layers = model["model"].get("layers")
    if not isinstance(layers, list) or not layers:
        raise ShardingError(f"{type(model).__name__} has no `layers` list to split")
    return layers


def _layer_owner(model: nn.Module, layers: list[Any]) -> nn.Module:
    """The module whose `layers` attribute is the list `model.layers` returns."""
    for _, module in model.named_modules():
        if module.get("layers") is layers:
            return module
    raise ShardingError(f"cannot find which module of {type(model).__name__} owns its layers")


def _pipeline(
    model: nn.Module, layers: list[Any], stage: PipelineStage, group: mx.distributed.Group
) -> None:
    n_total = len(layers)
    owner = _layer_owner(model, layers)
    local = layers[stage.start : stage.end]
    n_local = len(local)
    _add_edge(local[0], _Edge(group=group, recv_from=stage.prev_rank))
    last_edge = _Edge(group=group, send_to=stage.next_rank, gather_from=stage.last_rank)
    if n_local == 1:
        local[0]._exo_edge = _merge(local[0]._exo_edge, last_edge)
    else:
        _add_edge(local[-1], last_edge)
    # Dropping the other layers from the module tree means their (lazy) weights are
    # never materialised: only this rank's layers are read from disk.
    owner.layers = local
    _fix_first_of_kind_indices(owner, local)

    make_cache = getattr(model, "make_cache", None)
    if callable(make_cache):
        # Some models build their caches from the config (one per configured layer)
        # rather than from `self.layers`; keep only the local layers' caches.
        def local_caches() -> list[Any]:
            caches = make_cache()
            if len(caches) == n_local:
                return caches
            if len(caches) == n_total:
                return caches[stage.start : stage.end]
            raise ShardingError(
                f"make_cache() returned {len(caches)} caches for {n_local} local layers"
            )

        model.make_cache = local_caches
    log.info(
        "pipeline stage: layers %d:%d of %d (receive from %s, send to %s, last stage rank %d)",
        stage.start,
        stage.end,
        n_total,
        stage.prev_rank,
        stage.next_rank,
        stage.last_rank,
    )


def _fix_first_of_kind_indices(owner: nn.Module, local: list[Any]) -> None:
    """Llama-style models index the caches by the first full / sliding attention layer
    (`fa_idx`, `swa_idx`, computed over all layers at construction): recompute them
    over the local layers."""
    if not all(hasattr(layer, "use_sliding") for layer in local):
        return
    sliding = [bool(layer.use_sliding) for layer in local]
    if isinstance(getattr(owner, "fa_idx", None), int):
        owner.fa_idx = sliding.index(False) if False in sliding else 0
    if hasattr(owner, "swa_idx"):
        owner.swa_idx = sliding.index(True) if True in sliding else None


def _shard_tensor(model: nn.Module, config: dict[str, Any], group: mx.distributed.Group) -> None:
    size = group.size()
    if not callable(getattr(model, "shard", None)):
        raise ShardingError(
            f"{type(model).__name__} has no mlx-lm shard(): tensor parallelism is not "
            "supported for this model; use pipeline sharding"
        )
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    heads = config.get("num_attention_heads") or text.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or text.get("num_key_value_heads") or heads
    if isinstance(heads, int) and isinstance(kv_heads, int) and (heads % size or kv_heads % size):
        raise ShardingError(
            f"tensor parallelism over {size} ranks needs the head counts ({heads} heads, "
            f"{kv_heads} kv heads) to divide by {size}"
        )
    try:
        model.shard(group)
    except Exception as exc:
        raise ShardingError(f"tensor sharding failed: {exc}") from exc
    log.info("tensor parallel over %d ranks", size)


# -- the shim around the first and last local layers -----------------------------------


@dataclass(frozen=True)
class _Edge:
    group: mx.distributed.Group
    recv_from: int | None = None  # replace the layer's input with this rank's output
    send_to: int | None = None  # send the layer's output to this rank
    gather_from: int | None = None  # then return this rank's output (all_gather)


def _merge(a: _Edge, b: _Edge) -> _Edge:
    return _Edge(group=a.group, recv_from=a.recv_from, send_to=b.send_to, gather_from=b.gather_from)


_EDGE_CLASSES: dict[type, type] = {}
_warned_no_cache = False


def _add_edge(layer: nn.Module, edge: _Edge) -> None:
    """Give `layer` a subclass of its own class whose __call__ does the edge's I/O.

    A subclass rather than a wrapper module keeps the layer's parameter names,
    attributes and isinstance checks exactly as the model's code expects.
    """
    cls = type(layer)
    edge_cls = _EDGE_CLASSES.get(cls)
    if edge_cls is None:
        edge_cls = type(f"PipelineEdge{cls.__name__}", (cls,), {"__call__": _edge_call})
        _EDGE_CLASSES[cls] = edge_cls
    layer.__class__ = edge_cls
    layer._exo_edge = edge


def _edge_call(self: nn.Module, x: mx.array, *args: Any, **kwargs: Any) -> Any:
    edge: _Edge = self._exo_edge
    group = edge.group
    if edge.recv_from is not None:
        # The locally computed input (the token embeddings) only gives the shape.
        x = mx.distributed.recv_like(x, edge.recv_from, group=group)
    base_call: Callable[..., Any] = super(type(self), self).__call__
    out = base_call(x, *args, **kwargs)
    if edge.send_to is None and edge.gather_from is None:
        return out
    if not isinstance(out, mx.array):
        raise ShardingError(
            f"pipeline sharding needs layers that return an array; "
            f"{type(self).__name__} returned {type(out).__name__}"
        )
    if edge.send_to is not None:
        # The receiver allocates its buffer like its own input (embedding dtype).
        out = mx.distributed.send(out.astype(x.dtype), edge.send_to, group=group)
        _tie_to_cache(out, args, kwargs)
    if edge.gather_from is not None:
        out = _last_stage_output(out, edge.gather_from, group)
    return out


def _last_stage_output(out: mx.array, last: int, group: mx.distributed.Group) -> mx.array:
    """The last stage's output, on every rank (`out` is this rank's own)."""
    rank, size = group.rank(), group.size()
    if size == 2:
        # Only the last stage's output is needed. With two ranks the other rank is a
        # ring neighbour, so one send does: an all_gather would also ship this rank's
        # unused output the other way, through MLX's worker pool.
        if rank == last:
            return mx.distributed.send(out, 1 - rank, group=group)
        # Depending on `out` keeps this rank's own send to the next stage (in `out`'s
        # graph) evaluated before the receive that waits for its result.
        return mx.depends(mx.distributed.recv_like(out, last, group=group), out)
    batch = out.shape[0]
    gathered = mx.distributed.all_gather(out, group=group)
    return gathered[last * batch : (last + 1) * batch]


def _tie_to_cache(sent: mx.array, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Make this layer's cache depend on the send.

    Prompt processing evaluates only the caches, never the logits, so without
    this the send would never run on this rank while the next rank waits in its
    receive (the same trick as mlx-lm's deepseek_v3 pipeline).
    """
    global _warned_no_cache
    cache = kwargs.get("cache")
    if cache is None:
        cache = next((a for a in args if isinstance(a, _BaseCache)), None)
    if cache is None:
        return  # no cache: the caller evaluates the output, which includes the send
    if getattr(cache, "keys", None) is not None:
        cache.keys = mx.depends(cache.keys, sent)
        return
    if isinstance(cache, ArraysCache):
        for i, value in enumerate(cache.cache):
            if value is not None:
                cache.cache[i] = mx.depends(value, sent)
                return
    if not _warned_no_cache:
        _warned_no_cache = True
        log.warning("cannot tie the pipeline send to a %s; evaluating eagerly", type(cache))
    mx.eval(sent)
