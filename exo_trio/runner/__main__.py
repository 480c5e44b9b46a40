"""``python -m exo_trio.runner``: the runner process's command line.

    python -m exo_trio.runner --model PATH --model-id ID [--max-batch N] [--cpus 0,1]
                              [--prompt-cache-bytes N] [--rank R --world-size N --hostfile F ...]

A world size of 1 runs the whole model (loop.py); more makes this process one rank
of a model split across an `mx.distributed` group (rank.py has those flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from exo_trio.affinity import parse_cores, pin_this_thread
from exo_trio.runner.loop import (
    ProtocolWriter,
    QueueItem,
    Runner,
    claim_stdout,
    progress_to,
    read_commands,
    report_load_failure,
    report_ready,
)
from exo_trio.runner.protocol import DEFAULT_PROMPT_CACHE_BYTES, Loading
from exo_trio.runner.rank import add_shard_arguments, check_shard_arguments, serve_sharded

log = logging.getLogger("exo_trio.runner")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m exo_trio.runner", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--model-id", required=True, help="model id reported in Ready")
    parser.add_argument("--max-batch", type=int, default=16, help="max concurrent sequences")
    parser.add_argument(
        "--cpus", type=parse_cores, help="pin this process to these cores, e.g. 0,1 (Linux)"
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=DEFAULT_PROMPT_CACHE_BYTES,
        help="bound of the prefix cache (KV of finished requests); 0 turns it off",
    )
    add_shard_arguments(parser)
    args = parser.parse_args(argv)
    check_shard_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # Pin before anything else, argument checking included (it imports MLX, which
    # starts threads): a thread inherits its creator's cores when it is started.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--cpus", type=parse_cores)
    cpus = early.parse_known_args(argv)[0].cpus
    if cpus:
        pin_this_thread(cpus)
    args = parse_args(argv)
    writer = ProtocolWriter(claim_stdout())
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("EXO_TRIO_RUNNER_LOG", "INFO").upper(),
        format=f"runner[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    nice = int(os.environ.get("EXO_TRIO_RUNNER_NICE", "0"))
    if nice:
        os.nice(nice)
    if args.world_size > 1:
        status = serve_sharded(args, writer)
        # os._exit, not a return: MLX's group threads may still be blocked on a lost
        # peer, and interpreter shutdown must not wait for them.
        writer.send_final([], status)
    commands: queue.Queue[QueueItem] = queue.Queue()
    # Start reading at once so EOF or Shutdown during a long load are seen as soon
    # as the load ends, and the worker's pipe never fills up.
    threading.Thread(
        target=read_commands, args=(sys.stdin.fileno(), commands), name="stdin", daemon=True
    ).start()
    try:
        writer.send([Loading(fraction=0.0, phase="starting")])
        from exo_trio.runner.engine import Engine  # MLX: only once stdout is claimed

        engine = Engine.load(
            args.model,
            args.model_id,
            max_batch=args.max_batch,
            on_progress=progress_to(writer),
            prompt_cache_bytes=args.prompt_cache_bytes,
        )
    except BrokenPipeError:
        return 1
    except Exception as exc:
        return report_load_failure(writer, args.model, exc)
    try:
        report_ready(writer, engine, args.model_id)
        return Runner(engine, writer, commands).run()
    except BrokenPipeError:
        # The worker closed its end of our stdout: nobody is listening any more.
        log.warning("protocol pipe closed by the worker; exiting")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
