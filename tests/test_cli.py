"""The command line: every flag from its environment variable, a config file,
defaults in --help, one-line errors, --version, `exo-trio secret`, log setup."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from exo_trio import __version__
from exo_trio.api.access_log import format_line
from exo_trio.cli import build_parser, parse_args
from exo_trio.cli_config import configurable, env_name
from exo_trio.console import JsonFormatter, parse_levels, setup_logging


def node_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["node"]  # type: ignore[union-attr]


def sample(action: argparse.Action) -> tuple[str, Any]:
    """A valid environment value for the flag, and what it parses to."""
    if isinstance(action, argparse._StoreTrueAction):
        return "true", True
    if action.choices:
        choice = list(action.choices)[-1]
        return choice, choice
    if isinstance(action, argparse._AppendAction):
        return "10.0.0.2:1, 10.0.0.3:2", ["10.0.0.2:1", "10.0.0.3:2"]
    if action.type is Path:
        return "/some/where", Path("/some/where")
    if action.type is not None:
        return "7", action.type("7")  # type: ignore[operator]
    return "some-value", "some-value"


def test_every_node_flag_can_be_set_from_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    actions = configurable(node_parser())
    assert len(actions) >= 30
    expected = {}
    for action in actions:
        raw, value = sample(action)
        monkeypatch.setenv(env_name(action), raw)
        expected[action.dest] = value
    args = parse_args(["node"])
    for dest, value in expected.items():
        assert getattr(args, dest) == value, dest
    # The command line still wins.
    assert parse_args(["node", "--api-port", "9"]).api_port == 9
    names = {env_name(a) for a in actions}
    assert {"EXO_TRIO_API_KEY", "EXO_TRIO_CLUSTER_SECRET", "EXO_TRIO_LOG"} <= names


def test_help_names_each_variable_and_default() -> None:
    text = node_parser().format_help().replace("\n", " ")
    text = " ".join(text.split())
    for action in configurable(node_parser()):
        assert f"${env_name(action)}" in text, action.dest
    assert "[$EXO_TRIO_API_PORT, default 52415]" in text
    assert "$EXO_TRIO_DRAIN_TIMEOUT, default 5.0" in text
    assert "$EXO_TRIO_PROMPT_CACHE_BYTES, default 1G" in text


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'api-port = 8000\nmax_batch = 4\npeer = ["10.0.0.2:52416"]\nno-discovery = true\n'
        'log-format = "json"\n'
    )
    args = parse_args(["node", "--config", str(config), "--max-batch", "2"])
    assert (args.api_port, args.max_batch, args.peer) == (8000, 2, ["10.0.0.2:52416"])
    assert args.no_discovery and args.log_format == "json"


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "exo_trio.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["node", "--max-batch", "0"], {}, "--max-batch: must be at least 1"),
        (["node"], {"EXO_TRIO_API_PORT": "x"}, "$EXO_TRIO_API_PORT"),
        (["node", "--config", "/nonexistent.toml"], {}, "cannot read config file"),
        (["node", "--model", "/nonexistent-model"], {}, "--model /nonexistent-model: no such"),
        (["node", "--cluster-secret", "short"], {}, "cluster secret is 5 bytes"),
        (["node", "--api-host", "0.0.0.0"], {}, "without an API key"),
        (["node", "--prompt-cache-bytes", "lots"], {}, "--prompt-cache-bytes: expected a size"),
    ],
)
def test_bad_settings_fail_in_one_line_with_status_2(
    tmp_path: Path, argv: list[str], env: dict[str, str], says: str
) -> None:
    result = run_cli(*argv, "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_bad_config_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("api_prot = 1\n")
    result = run_cli("node", "--config", str(config))
    assert result.returncode == 2 and "unknown setting 'api_prot'" in result.stderr


def test_version_and_secret() -> None:
    assert run_cli("--version").stdout.strip() == f"exo-trio {__version__}"
    first, second = run_cli("secret").stdout.strip(), run_cli("secret").stdout.strip()
    assert len(first) >= 40 and first != second


def test_verbose_turns_on_our_debug_loggers_only() -> None:
    setup_logging(True, None, "text", lone=True, stream=StringIO())
    assert logging.getLogger("exo_trio.worker").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("exo_trio.cluster").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("trio_websocket").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("hypercorn.error").isEnabledFor(logging.DEBUG)


def test_a_lone_node_keeps_cluster_detail_quiet_unless_asked() -> None:
    setup_logging(False, None, "text", lone=True, stream=StringIO())
    assert not logging.getLogger("exo_trio.cluster").isEnabledFor(logging.INFO)
    assert logging.getLogger("exo_trio.access").isEnabledFor(logging.INFO)
    logging.getLogger("exo_trio.cluster").setLevel(logging.NOTSET)
    setup_logging(False, None, "text", lone=False, stream=StringIO())
    assert logging.getLogger("exo_trio.cluster").isEnabledFor(logging.INFO)


def test_log_level_reaches_libraries() -> None:
    assert parse_levels("warning,trio_websocket=debug") == {
        "": logging.WARNING,
        "trio_websocket": logging.DEBUG,
    }
    setup_logging(False, "info,trio_websocket=debug", "text", lone=True, stream=StringIO())
    assert logging.getLogger("trio_websocket").isEnabledFor(logging.DEBUG)


def test_access_line_and_its_json_form() -> None:
    record = {
        "method": "POST",
        "path": "/v1/messages",
        "status": 200,
        "client": "127.0.0.1:5000",
        "model": "demo",
        "prompt": 12,
        "completion": 30,
        "end": "length",
        "ttft": 0.0123,
        "total": 0.5,
        "id": "msg-1",
    }
    assert format_line(record) == (
        "POST /v1/messages 200 model=demo prompt=12 completion=30 end=length "
        "ttft=0.012s total=0.500s id=msg-1 client=127.0.0.1:5000"
    )
    line = logging.LogRecord("exo_trio.access", logging.INFO, "", 0, "x", (), None)
    line.fields = record  # type: ignore[attr-defined]
    parsed = json.loads(JsonFormatter().format(line))
    assert parsed["status"] == 200 and parsed["ttft"] == 0.0123 and parsed["message"] == "x"
