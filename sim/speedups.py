"""Simulator-only speed-ups that change no behaviour.

Every run builds a fresh app (create_app) so that no state leaks between seeds.
Werkzeug compiles a URL *builder* for every route eagerly, through `ast` and
`compile`, which was most of the cost of building an app (about 3 ms of a 20 ms
run). Nothing on the simulated path builds URLs, so the builder is compiled on
first use instead. If Werkzeug changes this private method, the patch is skipped
(the simulator is then slower, not wrong).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

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
