"""Where a flag's value comes from: the command line, else the environment, else a
`--config` TOML file, else its default.

Every long flag `--some-flag` of a command that opts in reads `EXO_TRIO_SOME_FLAG`
(a few have a shorter established name, see `ENV_NAMES`), and its help says so
with its default. A config file holds the same names as keys, with dashes or
underscores: `api-port = 8000`, `peer = ["10.0.0.2:52416"]`, `no-discovery = true`.
Values from the environment or a file go through the flag's own type and choices,
so a bad one is refused like a bad flag: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

ENV_PREFIX = "EXO_TRIO_"
# Flags whose variable is not simply EXO_TRIO_<FLAG>.
ENV_NAMES = {"log_level": "EXO_TRIO_LOG"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (the usage of a command with thirty flags
    would bury the message) pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def env_name(action: argparse.Action) -> str:
    return ENV_NAMES.get(action.dest, ENV_PREFIX + action.dest.upper())


def configurable(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions that take their value from the environment or a config file."""
    return [
        a
        for a in parser._actions
        if a.option_strings
        and a.dest not in ("help", "version", "config")
        and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    ]


def document_sources(parser: argparse.ArgumentParser) -> None:
    """Append each flag's environment variable and default to its help."""
    for action in configurable(parser):
        default = action.default
        if isinstance(action, argparse._StoreTrueAction) or default is None or default == []:
            shown = ""
        else:
            shown = f", default {default}"
        action.help = f"{action.help or ''} [${env_name(action)}{shown}]".strip()


def convert(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str) -> Any:
    """A raw value (a string from the environment, or a TOML value) as the flag
    itself would have parsed it; exits with one line if it is not valid."""
    if isinstance(action, argparse._StoreTrueAction):
        text = str(raw).lower()
        if isinstance(raw, bool) or text in _TRUE | _FALSE:
            return raw if isinstance(raw, bool) else text in _TRUE
        parser.error(f"{where}: expected true or false, got {raw!r}")
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else str(raw).replace(",", " ").split()
        return [convert_one(parser, action, item, where) for item in items]
    if isinstance(raw, list | dict):
        parser.error(f"{where}: expected one value, got {raw!r}")
    return convert_one(parser, action, raw, where)


def convert_one(
    parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str
) -> Any:
    text = str(raw)
    value: Any = text
    if action.type is not None:
        try:
            value = action.type(text)  # type: ignore[operator]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{where}: {exc or f'invalid value {text!r}'}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{where}: invalid choice {text!r} (choose from {choices})")
    return value


def read_config(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    try:
        with path.expanduser().open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        parser.error(f"cannot read config file {path}: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"config file {path} is not valid TOML: {exc}")


def apply_sources(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Set the parser's defaults from the config file (if any) and the environment,
    before it parses `argv`, so that the command line still wins."""
    environ = os.environ if environ is None else environ
    actions = {a.dest: a for a in configurable(parser)}
    config_path = _config_path(argv, environ)
    if config_path is not None:
        config = read_config(parser, config_path)
        for key, raw in config.items():
            action = actions.get(key.replace("-", "_"))
            if action is None:
                parser.error(f"config file {config_path}: unknown setting {key!r}")
            value = convert(parser, action, raw, f"{key} in {config_path}")
            parser.set_defaults(**{action.dest: value})
    for dest, action in actions.items():
        name = env_name(action)
        if name in environ:
            parser.set_defaults(**{dest: convert(parser, action, environ[name], f"${name}")})


def _config_path(argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    value = environ.get(ENV_PREFIX + "CONFIG")
    return Path(value) if value else None


def fail(message: str) -> NoReturn:
    """A start-up error: one line on stderr, exit status 2."""
    print(f"exo-trio: {message}", file=sys.stderr)
    raise SystemExit(2)
