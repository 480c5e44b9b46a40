"""Facts about this machine, measured (psutil) rather than read by hand.

Memory is what placement splits a model by: `available` is what can be given to
a new process without swapping (Linux's MemAvailable; on macOS free plus
inactive pages), `total` the installed RAM.
"""

from __future__ import annotations

import psutil


def memory_available() -> int:
    """Bytes of memory a new process can take without swapping."""
    return int(psutil.virtual_memory().available)


def memory_total() -> int:
    """Bytes of installed memory."""
    return int(psutil.virtual_memory().total)


def gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
