"""The `exo-trio` command line.

One `add_*` function builds each subcommand's flags and one `run_*` function runs
it. Every flag of `exo-trio node` can also come from the environment
(`EXO_TRIO_<FLAG>`) or a `--config` TOML file (cli_config.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from exo_trio import __version__, client_cli
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
from exo_trio.cli_config import Parser, apply_sources, document_sources, fail

DEFAULT_DRAIN_TIMEOUT = 5.0


def number(text: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = int(number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def port(text: str) -> int:
    value = int(number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text, float)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def byte_size(text: str) -> int:
    """`4G`, `512M`, `64K` or a number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(body[-1:], 1)
    try:
        value = float(body[:-1] if scale > 1 else body) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 4G, got {text!r}") from None
    if not 0 <= value < 1 << 62:
        raise argparse.ArgumentTypeError(f"a size must be >= 0, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="exo-trio", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"exo-trio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_node(sub)
    add_demo_model(sub)
    add_secret(sub)
    client_cli.add_commands(sub)
    return parser


def add_node(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="run a node: HTTP API, worker and runner")
    node.add_argument(
        "--config", type=Path, help="a TOML file of flag values [$EXO_TRIO_CONFIG, no default]"
    )
    node.add_argument(
        "--model",
        action="append",
        default=[],
        help="a model to serve from the start: an MLX model directory, or a hub model "
        "org/name[@revision] (downloaded by the nodes that run it); repeatable "
        "(default: the demo model)",
    )
    node.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        help="serve the --model of the same position under this name (default: its hub "
        "id or directory name)",
    )
    node.add_argument(
        "--no-model",
        action="store_true",
        help="start with no model (place them at run time: POST /v1/instances, "
        "exo-trio run, Ollama's /api/pull and first use)",
    )
    node.add_argument("--api-host", default="127.0.0.1")
    node.add_argument("--api-port", type=port, default=52415)
    node.add_argument(
        "--data-dir",
        type=Path,
        help="where the node keeps its files (default: $XDG_DATA_HOME/exo-trio, "
        "else ~/.local/share/exo-trio)",
    )
    node.add_argument(
        "--max-batch", type=positive_int, default=16, help="concurrent sequences per runner"
    )
    node.add_argument("--max-body-bytes", type=positive_int, default=4 * 1024 * 1024)
    node.add_argument(
        "--keepalive", type=positive_float, default=2.0, help="SSE keep-alive interval, s"
    )
    node.add_argument(
        "--max-queued",
        type=non_negative_int,
        default=DEFAULT_MAX_QUEUED,
        help="generation requests that may wait beyond the runner's batch; more get 429/503",
    )
    node.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=DEFAULT_DRAIN_TIMEOUT,
        help="on SIGTERM/Ctrl-C, seconds in-flight requests may take to finish before "
        "they end with an error event (a second signal stops at once)",
    )
    limits = node.add_argument_group("per-request limits (seconds, 0 = off)")
    for flag, default, text in (
        ("--ttft-timeout", DEFAULT_TTFT_TIMEOUT, "end a request with no first token by then"),
        ("--idle-timeout", DEFAULT_IDLE_TIMEOUT, "end a request whose next token does not come"),
        ("--request-timeout", DEFAULT_REQUEST_TIMEOUT, "end a request that runs longer"),
        ("--send-timeout", DEFAULT_SEND_TIMEOUT, "drop a client that takes no bytes that long"),
        (
            "--wedge-timeout",
            DEFAULT_WEDGE_TIMEOUT,
            "/health is 503 when the runner holds work without progress that long",
        ),
    ):
        limits.add_argument(flag, type=non_negative_float, default=default, help=text)
    access = node.add_argument_group("access")
    access.add_argument("--api-key", help="require this key on every endpoint but /health")
    access.add_argument(
        "--insecure-no-api-key",
        action="store_true",
        help="allow serving a non-loopback --api-host without an API key",
    )
    access.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser calls from this origin (repeatable; '*' for any)",
    )
    cluster = node.add_argument_group("cluster")
    cluster.add_argument("--node-id", help="this node's id (default: kept in the data dir)")
    cluster.add_argument(
        "--listen",
        help="HOST:PORT for links to other nodes (default: port 52416, or the first free "
        "port above --api-port when it is taken; 127.0.0.1 without a secret, 0.0.0.0 "
        "with one; port 0 picks any free port)",
    )
    cluster.add_argument(
        "--peer", action="append", default=[], help="HOST:PORT of another node (repeatable)"
    )
    cluster.add_argument("--cluster-id", default="exo-trio", help="nodes join only their cluster")
    cluster.add_argument(
        "--cluster-secret",
        help="shared secret authenticating every link, 16 bytes or more (`exo-trio secret` "
        "makes one); without one the node links only over loopback",
    )
    cluster.add_argument(
        "--insecure-weak-secret",
        action="store_true",
        help="accept a cluster secret shorter than 16 bytes",
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
        type=non_negative_float,
        default=10.0,
        help="seconds to wait for peers before the first automatic placement",
    )
    node.add_argument(
        "--prompt-cache-bytes",
        type=byte_size,
        default="1G",  # DEFAULT_PROMPT_CACHE_BYTES, as --help shows it
        metavar="SIZE",
        help="bound of each runner's prefix cache (KV of finished requests reused by "
        "prompts that start the same way), e.g. 512M or 4G; 0 turns it off",
    )
    node.add_argument(
        "--cpu-affinity",
        choices=["auto", "off"],
        default="auto",
        help="auto (Linux): pin a lone runner to its own cores and the node to the rest",
    )
    logs = node.add_argument_group("logging")
    logs.add_argument(
        "-v", "--verbose", action="store_true", help="debug lines of exo-trio's own loggers"
    )
    logs.add_argument(
        "--log-level",
        help="LEVEL for every logger, libraries included, or a list such as "
        "'info,trio_websocket=debug'",
    )
    logs.add_argument("--log-format", choices=["text", "json"], default="text")
    document_sources(node)


def add_demo_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo-model", help="write the built-in demo model to a directory")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument(
        "--size",
        choices=["demo", "medium"],
        default="demo",
        help="demo: the 4M-parameter model `node` serves by default; medium: ~94M, for benchmarks",
    )


def add_secret(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser(
        "secret",
        help="print a strong random cluster secret",
        description="Print a strong random cluster secret (32 random bytes, URL-safe). "
        "Give the same one to every node: --cluster-secret or $EXO_TRIO_CLUSTER_SECRET.",
    )


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) -> (host, port), with a usage error if malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        fail(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port_text)


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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    if len(argv) >= 1 and argv[0] == "node":
        node = parser._subparsers._group_actions[0].choices["node"]  # type: ignore[union-attr]
        apply_sources(node, argv[1:])
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        # `run MODEL --max-tokens 8 some words`: the prompt may follow the options.
        args.prompt += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in client_cli.COMMANDS:
        return client_cli.main(args)
    if args.command == "demo-model":
        return run_demo_model(args)
    if args.command == "secret":
        return run_secret(args)
    return run_node(args)


def run_demo_model(args: argparse.Namespace) -> int:
    from exo_trio.demo_model import build_demo_model

    path = build_demo_model(args.out, args.size)
    print(f"wrote demo model to {path}")
    return 0


def run_secret(args: argparse.Namespace) -> int:
    from exo_trio.net.auth import generate_secret

    print(generate_secret())
    return 0


def run_node(args: argparse.Namespace) -> int:
    from exo_trio import console, startup
    from exo_trio.api.auth import check_exposure
    from exo_trio.api.settings import ApiSettings
    from exo_trio.net.auth import MIN_SECRET_BYTES

    secret = args.cluster_secret.encode() if args.cluster_secret else None
    lone = secret is None and not args.peer
    console.setup_logging(args.verbose, args.log_level, args.log_format, lone=lone)
    log = logging.getLogger("exo_trio")
    # Every check that can fail does so here, in one line, before anything heavy.
    if secret is not None and len(secret) < MIN_SECRET_BYTES and not args.insecure_weak_secret:
        fail(
            f"the cluster secret is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(`exo-trio secret` prints a strong one) or pass --insecure-weak-secret"
        )
    api = ApiSettings(
        max_body_bytes=args.max_body_bytes,
        keepalive_interval=args.keepalive,
        ttft_timeout=args.ttft_timeout,
        idle_timeout=args.idle_timeout,
        request_timeout=args.request_timeout,
        send_timeout=args.send_timeout,
        wedge_timeout=args.wedge_timeout,
        max_queued=args.max_queued,
        api_key=args.api_key or None,
        cors_origins=tuple(args.cors_origin),
    )
    try:
        check_exposure(args.api_host, api, args.insecure_no_api_key)
    except SystemExit as exc:
        fail(str(exc.code).removeprefix("exo-trio: "))
    models = tuple(str(startup.check_model_dir(Path(m))) for m in args.model)
    data_dir = startup.check_data_dir(args.data_dir or startup.default_data_dir())
    peers = tuple(parse_address(p) for p in args.peer)
    listen = parse_address(args.listen) if args.listen else None
    listen_host = listen[0] if listen else ("0.0.0.0" if secret else "127.0.0.1")
    startup.check_api_port(args.api_host, args.api_port)
    listen_port, note = startup.choose_link_port(
        listen_host, listen[1] if listen else None, args.api_port
    )
    if note:
        log.warning("%s", note)

    # Before the daemon's imports: they load MLX, which starts threads, and only
    # threads started after the pin inherit it.
    split = place_on_cores() if args.cpu_affinity == "auto" else None
    import trio

    from exo_trio.daemon import NodeConfig
    from exo_trio.daemon import run_node as run_daemon
    from exo_trio.net.links import InsecureAddressError

    config = NodeConfig(
        models=models,
        no_model=args.no_model,
        served_model_names=tuple(args.served_model_name),
        api_host=args.api_host,
        api_port=args.api_port,
        data_dir=data_dir,
        max_batch=args.max_batch,
        api=api,
        insecure_no_api_key=args.insecure_no_api_key,
        node_id=args.node_id,
        listen_host=listen_host,
        listen_port=listen_port,
        peers=peers,
        cluster_id=args.cluster_id,
        cluster_secret=secret,
        allow_weak_secret=args.insecure_weak_secret,
        discovery=not args.no_discovery,
        auto_place=args.placement == "auto",
        advertise_host=args.advertise_host,
        settle=args.settle,
        cores=split,
        drain_timeout=args.drain_timeout,
        prompt_cache_bytes=args.prompt_cache_bytes,
    )
    try:
        trio.run(run_daemon, config)
    except (InsecureAddressError, startup.StartupError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        # Only if a signal arrived before the node installed its handler.
        return 130
    exit_without_teardown(0)


def exit_without_teardown(status: int) -> NoReturn:
    """End a node that has stopped cleanly without the interpreter's teardown.

    By now every request, runner, link and log line is ended and flushed. What is
    left is the teardown of native libraries the tokenizer loaded (libmlx and its
    thread pools): about one stop in eight under load it aborted there ("terminate
    called without an active exception", status 134) after "node stopped" was logged,
    turning a clean stop into a crash for systemd and for scripts."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
