"""Checks a node makes before anything heavy starts, each failing with one line.

`exo-trio node` runs these before it imports the daemon (Quart, the tokenizer) and
long before a runner loads a model, so a port in use or a wrong path costs a
fraction of a second and says which flag to change (exit status 2, cli_config.fail).
A port found free here can still be taken before the node binds it; that race
ends in the bind's own error, which is rare enough to leave as it is.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from exo_trio.cli_config import fail

DEFAULT_LINK_PORT = 52416
# Where a node whose default link port is taken looks for one: just above its API
# port (a second node on a machine is usually given the next API port).
LINK_PORT_SEARCH = 16


class StartupError(Exception):
    """A problem found once the node has begun starting (its models described):
    `exo-trio node` prints it as one line and exits with status 2, like `fail`."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "exo-trio"


def port_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on now (in use, or no such address), or None.
    Binds as hypercorn and trio do (SO_REUSEADDR), so a port in TIME_WAIT is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use"
            return exc.strerror or str(exc)
    return None


def check_api_port(host: str, port: int) -> None:
    problem = port_problem(host, port)
    if problem == "in use":
        fail(
            f"API port {port} on {host} is in use (another exo-trio node?); "
            "choose another with --api-port"
        )
    if problem is not None:
        fail(f"cannot serve the API on {host}:{port}: {problem} (--api-host, --api-port)")


def choose_link_port(host: str, port: int | None, api_port: int) -> tuple[int, str | None]:
    """The link port to listen on, and a note for the log if it is not the asked one.

    `port` is what --listen gave (None: not given). A given port must be free; the
    default, if taken, gives way to the first free port above the API port, so a
    second node on one machine needs only its own --api-port."""
    if port is not None:
        if port == 0:
            return 0, None
        problem = port_problem(host, port)
        if problem == "in use":
            fail(f"link port {port} on {host} is in use; choose another with --listen HOST:PORT")
        if problem is not None:
            fail(f"cannot listen for links on {host}:{port}: {problem} (--listen)")
        return port, None
    if port_problem(host, DEFAULT_LINK_PORT) is None:
        return DEFAULT_LINK_PORT, None
    for candidate in range(api_port + 1, min(api_port + 1 + LINK_PORT_SEARCH, 65536)):
        if candidate != DEFAULT_LINK_PORT and port_problem(host, candidate) is None:
            return candidate, (
                f"link port {DEFAULT_LINK_PORT} is taken; links listen on {candidate} "
                "instead (set --listen HOST:PORT to choose)"
            )
    fail(
        f"link port {DEFAULT_LINK_PORT} and ports {api_port + 1}-{api_port + LINK_PORT_SEARCH} "
        f"on {host} are in use; choose one with --listen HOST:PORT"
    )


def check_model_dir(path: Path | None) -> Path | None:
    """The resolved model directory, if it looks like one we can read; a hub model
    id (org/name[@revision], fetched by the daemon) as it is."""
    if path is None:
        return None
    resolved = path.expanduser().resolve()
    if not resolved.is_dir():
        from exo_trio.hub_plan import parse_hub_ref

        if not path.expanduser().exists() and parse_hub_ref(str(path)) is not None:
            return path
        fail(
            f"--model {path}: no such directory, and not a hub model id "
            "(org/name or org/name@revision)"
        )
    config = resolved / "config.json"
    if not config.is_file():
        fail(f"--model {path}: not an MLX model directory (no config.json)")
    if not os.access(config, os.R_OK) or not os.access(resolved, os.R_OK | os.X_OK):
        fail(f"--model {path}: not readable by this user")
    return resolved


def check_data_dir(path: Path) -> Path:
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--data-dir {path}: cannot create it ({exc.strerror or exc})")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"--data-dir {path}: not writable by this user")
    return path
