"""Simulator-only speed-ups that change no behaviour.

Every run builds a fresh app (create_app) for every node so that no state leaks
between seeds. Werkzeug compiles a URL *builder* for every route eagerly, through
`ast` and `compile`, which was most of the cost of building an app (about 3 ms of
a 20 ms run). Nothing on the simulated path builds URLs, so the builder is
compiled on first use instead. prometheus-client validates every metric name of
every node's registry; a name that passed once is not checked again. If either
library changes these private functions, the patch is skipped (the simulator is
then slower, not wrong).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import prometheus_client.metrics
import prometheus_client.metrics_core
from werkzeug.routing import rules

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    original = getattr(rules.Rule, "_compile_builder", None)
    if original is None or list(inspect.signature(original).parameters) != [
        "self",
        "append_unknown",
    ]:
        return

    def lazy_builder(self: rules.Rule, append_unknown: bool = True) -> Callable[..., Any]:
        compiled: Callable[..., Any] | None = None

        def build(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = original(self, append_unknown)
            return compiled(*args, **kwargs)

        return build

    rules.Rule._compile_builder = lazy_builder  # type: ignore[method-assign]
    _cache_metric_name_checks()


def _cache_metric_name_checks() -> None:
    """prometheus-client validates every metric's name (a regex, and an encode)
    each time a metric is made, and every node of every run makes the same few
    dozen: remember the names that passed. A name that fails still raises."""
    for module in (prometheus_client.metrics, prometheus_client.metrics_core):
        original = getattr(module, "_validate_metric_name", None)
        if original is None:
            continue
        passed: set[str] = set()

        def validate(name: str, _original: Any = original, _passed: set[str] = passed) -> None:
            if name not in _passed:
                _original(name)
                _passed.add(name)

        module._validate_metric_name = validate  # type: ignore[attr-defined]
