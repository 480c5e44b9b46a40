"""Shared fixtures: one demo model directory per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exo_trio.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def eos_ban(demo_model_dir: Path) -> dict[str, int]:
    """A logit_bias that bans the demo model's EOS ids, for exact lengths."""
    from exo_trio.prompts import HFPromptEncoder

    return {str(t): -100 for t in HFPromptEncoder(demo_model_dir).eos_token_ids}


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    """Tests (and the fuzz harnesses they run in-process) may silence loggers; put
    every level back afterwards, so later tests that read log lines see them."""
    import logging

    manager = logging.root.manager
    saved = {name: logging.getLogger(name).level for name in list(manager.loggerDict)}
    root_level = logging.root.level
    yield
    logging.root.setLevel(root_level)
    for name in list(manager.loggerDict):
        logger = logging.getLogger(name)
        logger.setLevel(saved.get(name, logging.NOTSET))
