"""Keep glibc from returning large freed buffers to the OS after every call or step.

Each call allocates a frame as large as its tensors, and each training step allocates its
activations and gradients anew. With glibc's defaults that memory goes back to the OS and
is faulted in again, page by page, on the next call or step:

- a multi-MiB buffer is mmap-ed and unmapped, or the main heap grows and is trimmed, on
  every call. Raising the mmap and trim thresholds keeps that memory.
- a thread other than the main one (the compute thread, gRPC's threads) allocates from a
  per-thread arena made of heaps of at most 64 MiB. When a heap beyond an arena's first
  becomes entirely free, glibc unmaps it whatever the trim threshold says, unless the
  arena's top pad is at least a heap's size. ``tests/test_malloc.py`` shows it: a step on the
  compute thread that needs two heaps faults in one of them afresh every time (10240 pages per
  step here), and none with the pad.

``benchmarks/malloc_settings.py`` records what the settings change on the CSL step (4 MiB each
way), in fresh process pairs against glibc's pad alone and against all of glibc's defaults.

The process's RSS stays near its peak instead. Set ``SPLITFLOWER_KEEP_MALLOC_DEFAULTS=1`` to
leave the allocator alone; a setting already made through its glibc variable
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) is respected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["KEEP_DEFAULTS_ENV", "SETTINGS", "keep_freed_memory"]

logger = logging.getLogger(__name__)

KEEP_DEFAULTS_ENV = "SPLITFLOWER_KEEP_MALLOC_DEFAULTS"
# glibc's environment variable, mallopt parameter and splitflower's value for each setting.
SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("MALLOC_MMAP_THRESHOLD_", -3, 128 * 1024 * 1024),
    ("MALLOC_TRIM_THRESHOLD_", -1, 256 * 1024 * 1024),
    ("MALLOC_TOP_PAD_", -2, 64 * 1024 * 1024),  # glibc's largest heap (HEAP_MAX_SIZE, 64-bit)
)
_applied: tuple[str, ...] | None = None


def keep_freed_memory() -> tuple[str, ...]:
    """Apply the settings once per process; returns the glibc variables of those applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = ()
    if os.environ.get(KEEP_DEFAULTS_ENV) == "1" or platform.system() != "Linux":
        return _applied
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return _applied
    _applied = tuple(
        variable
        for variable, parameter, value in SETTINGS
        if variable not in os.environ and mallopt(parameter, value) == 1
    )
    logger.debug("glibc malloc settings applied: %s", ", ".join(_applied) or "none")
    return _applied
