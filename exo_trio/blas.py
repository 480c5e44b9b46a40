"""Which BLAS the runners compute with.

On Linux the MLX CPU wheel (`mlx[cpu]`) links a reference BLAS of its own: its
matrix products are unoptimised, and a prompt's prefill (matrix-matrix products)
runs several times slower than it could. Measured on this project's 2-core
machine with the ~94M-parameter medium demo model: a 1024x1024x240 product 434 ms
against 71 ms, one stream 10 against 16.7 tokens/s, a joining request's first
token 1.27 against 0.16 s. The system's OpenBLAS exports the same symbols, so
preloading it into the runner process (LD_PRELOAD) makes MLX use it instead;
nothing else changes.

So the node starts every runner with the best BLAS it finds (`choose_blas`):
`EXO_TRIO_BLAS` if set (a library path, or `none` for the bundled one), else
OpenBLAS (its pthreads build first: OpenMP builds spin threads between calls).
With none found it says once, at start-up, how to install it. The runner reports
what it really loaded (`loaded_blas`, read from its own memory map) in `Ready`,
which /state and /health show.

OpenBLAS runs one thread per core the runner may use (OPENBLAS_NUM_THREADS), the
pinned set when the node pins it (affinity.py): more threads than cores would
only take turns. macOS builds of MLX use Accelerate and the GPU: nothing to do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BlasChoice", "choose_blas", "install_hint", "loaded_blas", "runner_env"]

# Where distributions put OpenBLAS, best first (pthreads builds before the
# generic name, which may point at an OpenMP build).
OPENBLAS_PATHS = (
    # Debian, Ubuntu: the pthreads flavour, then whatever the alternatives pick.
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    # Fedora, RHEL: libopenblasp is the pthreads build.
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    # Arch, Alpine and others.
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

# How to get OpenBLAS, by /etc/os-release ID (or ID_LIKE).
_INSTALL = {
    "debian": "apt-get install libopenblas0-pthread",
    "ubuntu": "apt-get install libopenblas0-pthread",
    "fedora": "dnf install openblas-threads",
    "rhel": "dnf install openblas-threads",
    "arch": "pacman -S openblas",
    "alpine": "apk add openblas",
}


@dataclass(frozen=True)
class BlasChoice:
    path: str | None  # the library to preload into runners; None: MLX's own BLAS
    name: str  # what runners compute with, for people
    hint: str | None = None  # how to get a faster one, when there is none

    def describe(self) -> dict[str, object]:
        return {"library": self.path, "name": self.name, "hint": self.hint}


def choose_blas(
    env: Mapping[str, str] = os.environ,
    platform: str = sys.platform,
    exists: Callable[[str], bool] = os.path.exists,
    os_release: str | None = None,
) -> BlasChoice:
    """The BLAS to start runners with (see the module docstring)."""
    if platform != "linux":
        return BlasChoice(None, "the platform's (MLX's default)")
    forced = env.get("EXO_TRIO_BLAS", "").strip()
    if forced.lower() == "none":
        return BlasChoice(None, "MLX's bundled reference BLAS (EXO_TRIO_BLAS=none)")
    if forced:
        if not exists(forced):
            return BlasChoice(
                None,
                "MLX's bundled reference BLAS",
                f"EXO_TRIO_BLAS={forced} does not exist (a library path, or none)",
            )
        return BlasChoice(forced, f"{forced} (EXO_TRIO_BLAS)")
    for path in OPENBLAS_PATHS:
        if exists(path):
            return BlasChoice(path, f"OpenBLAS ({path})")
    return BlasChoice(
        None,
        "MLX's bundled reference BLAS",
        f"install OpenBLAS for several times faster prompt processing: {install_hint(os_release)}",
    )


def install_hint(os_release: str | None = None) -> str:
    """The command that installs OpenBLAS here, from /etc/os-release."""
    if os_release is None:
        try:
            os_release = Path("/etc/os-release").read_text()
        except OSError:
            os_release = ""
    ids: list[str] = []
    for line in os_release.splitlines():
        key, _, value = line.partition("=")
        if key in ("ID", "ID_LIKE"):
            ids.extend(value.strip().strip('"').split())
    for distro in ids:
        if distro in _INSTALL:
            return _INSTALL[distro]
    return "your distribution's OpenBLAS package (e.g. apt-get install libopenblas0-pthread)"


def runner_env(choice: BlasChoice, threads: int) -> dict[str, str]:
    """Environment variables a runner process is started with (added to the node's)."""
    if choice.path is None:
        return {}
    preload = os.environ.get("LD_PRELOAD", "")
    if choice.path not in preload.split(":"):
        preload = f"{choice.path}:{preload}" if preload else choice.path
    return {"LD_PRELOAD": preload, "OPENBLAS_NUM_THREADS": str(max(1, threads))}


def loaded_blas(maps: str | None = None) -> str:
    """What BLAS this process has loaded (Linux: from /proc/self/maps)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "unknown"
    libraries = {line.rsplit(" ", 1)[-1] for line in maps.splitlines() if ".so" in line}
    for library in sorted(libraries):
        name = os.path.basename(library)
        # numpy's own OpenBLAS (libscipy_openblas64_) exports suffixed 64-bit
        # symbols: MLX never calls it.
        if name.startswith(("libopenblas", "libmkl_rt", "libblis")) and "64_" not in name:
            return library
    if any(os.path.basename(lib).startswith("libblas") for lib in libraries):
        return "MLX's bundled reference BLAS"
    return "the platform's (MLX's default)"
