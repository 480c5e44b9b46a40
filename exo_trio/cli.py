"""The `exo-trio` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import trio

from exo_trio import client_cli
from exo_trio.affinity import CoreSplit, format_cores, pin_this_thread, split_cores, usable_cores
from exo_trio.api.settings import (
    DEFAULT_MAX_QUEUED,
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_WEDGE_TIMEOUT,
)
from exo_trio.api.timeouts import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TTFT_TIMEOUT,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-trio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run a node: HTTP API, worker and runner")
    node.add_argument(
        "--model",
        type=Path,
        help="an MLX model directory, or a hub model org/name[@revision] to download "
        "(default: the demo model)",
    )
    node.add_argument(
        "--served-model-name", help="serve the model under this name (default: its hub id)"
    )
    node.add_argument("--api-host", default="127.0.0.1")
    node.add_argument("--api-port", type=int, default=52415)
    node.add_argument("--data-dir", type=Path, help="where the node keeps its files")
    node.add_argument("--max-batch", type=int, default=16, help="concurrent sequences per runner")
    node.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    node.add_argument("--keepalive", type=float, default=2.0, help="SSE keep-alive interval, s")
    limits = node.add_argument_group("per-request limits (seconds, 0 = off)")
    limits.add_argument(
        "--ttft-timeout",
        type=float,
        default=DEFAULT_TTFT_TIMEOUT,
        help="end a request that has no first token after this long (queueing included)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="end a request whose next token does not come for this long",
    )
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="end a request that runs longer than this in total",
    )
    limits.add_argument(
        "--send-timeout",
        type=float,
        default=DEFAULT_SEND_TIMEOUT,
        help="drop a client that takes no response bytes for this long (stopped reading)",
    )
    limits.add_argument(
        "--wedge-timeout",
        type=float,
        default=DEFAULT_WEDGE_TIMEOUT,
        help="/health is 503 when the runner holds work without progress for this long",
    )
    node.add_argument(
        "--max-queued",
        type=int,
        default=DEFAULT_MAX_QUEUED,
        help="generation requests that may wait beyond the runner's batch; more get 429/503",
    )
    node.add_argument(
        "--api-key",
        default=os.environ.get("EXO_TRIO_API_KEY") or None,
        help="require this key on every endpoint but /health (default: $EXO_TRIO_API_KEY)",
    )
    node.add_argument(
        "--insecure-no-api-key",
        action="store_true",
        help="allow serving a non-loopback --api-host without an API key",
    )
    node.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser calls from this origin (repeatable; '*' for any)",
    )
    cluster = node.add_argument_group("cluster")
    cluster.add_argument("--node-id", help="this node's id (default: kept in the data dir)")
    cluster.add_argument(
        "--listen",
        default=None,
        help="HOST:PORT for links to other nodes (default: 127.0.0.1:52416 without a "
        "secret, 0.0.0.0:52416 with one; port 0 picks a free port)",
    )
    cluster.add_argument(
        "--peer", action="append", default=[], help="HOST:PORT of another node (repeatable)"
    )
    cluster.add_argument("--cluster-id", default="exo-trio", help="nodes join only their cluster")
    cluster.add_argument(
        "--cluster-secret",
        default=os.environ.get("EXO_TRIO_CLUSTER_SECRET") or None,
        help="shared secret authenticating every link (default: $EXO_TRIO_CLUSTER_SECRET); "
        "without one the node links only over loopback",
    )
    cluster.add_argument(
        "--no-discovery", action="store_true", help="do not look for peers on the LAN"
    )
    cluster.add_argument(
        "--placement",
        choices=["auto", "manual"],
        default="auto",
        help="auto: the leader places the model across the nodes that serve it; "
        "manual: only POST /v1/instances does",
    )
    cluster.add_argument(
        "--advertise-host", help="address other nodes reach this one at (mx.distributed)"
    )
    cluster.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait for peers before the first automatic placement",
    )
    node.add_argument(
        "--cpu-affinity",
        choices=["auto", "off"],
        default="auto",
        help="auto (Linux): pin a lone runner to its own cores and the node to the rest",
    )
    node.add_argument("-v", "--verbose", action="store_true")

    demo = sub.add_parser("demo-model", help="write the built-in demo model to a directory")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument(
        "--size",
        choices=["demo", "medium"],
        default="demo",
        help="demo: the 4M-parameter model `node` serves by default; medium: ~94M, for benchmarks",
    )
    client_cli.add_commands(sub)
    return parser


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) -> (host, port), with a usage error if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"exo-trio: expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def place_on_cores() -> CoreSplit | None:
    """Pin this (still single-threaded) process to the node's share of the cores;
    the runners get the rest (exo_trio/affinity.py)."""
    cores = usable_cores()
    split = split_cores(cores) if cores else None
    if split is None or not pin_this_thread(split.node):
        return None
    logging.getLogger("exo_trio.affinity").info(
        "node on cores %s, a lone runner on cores %s",
        format_cores(split.node),
        format_cores(split.runners),
    )
    return split


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in client_cli.COMMANDS:
        return client_cli.main(args)
    if args.command == "demo-model":
        from exo_trio.demo_model import build_demo_model

        path = build_demo_model(args.out, args.size)
        print(f"wrote demo model to {path}")
        return 0

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # huggingface_hub's HTTP client logs every request at INFO.
    logging.getLogger("httpx2").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from exo_trio.api.app import ApiSettings

    # Before the daemon's imports: they load MLX, which starts threads, and only
    # threads started after the pin inherit it.
    split = place_on_cores() if args.cpu_affinity == "auto" else None
    from exo_trio.daemon import NodeConfig, default_data_dir, run_node

    listen = parse_address(args.listen) if args.listen else None
    config = NodeConfig(
        model_path=args.model,
        served_model_name=args.served_model_name,
        api_host=args.api_host,
        api_port=args.api_port,
        data_dir=args.data_dir or default_data_dir(),
        max_batch=args.max_batch,
        api=ApiSettings(
            max_body_bytes=args.max_body_bytes,
            keepalive_interval=args.keepalive,
            ttft_timeout=args.ttft_timeout,
            idle_timeout=args.idle_timeout,
            request_timeout=args.request_timeout,
            send_timeout=args.send_timeout,
            wedge_timeout=args.wedge_timeout,
            max_queued=args.max_queued,
            api_key=args.api_key,
            cors_origins=tuple(args.cors_origin),
        ),
        insecure_no_api_key=args.insecure_no_api_key,
        node_id=args.node_id,
        listen_host=listen[0] if listen else None,
        listen_port=listen[1] if listen else 52416,
        peers=tuple(parse_address(p) for p in args.peer),
        cluster_id=args.cluster_id,
        cluster_secret=args.cluster_secret.encode() if args.cluster_secret else None,
        discovery=not args.no_discovery,
        auto_place=args.placement == "auto",
        advertise_host=args.advertise_host,
        settle=args.settle,
        cores=split,
    )
    try:
        trio.run(run_node, config)
    except KeyboardInterrupt:
        # A second Ctrl-C during shutdown: leave without a traceback.
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
