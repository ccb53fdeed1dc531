"""Helpers the file-based loaders share: where the files are, and which versions were cached."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from splitflower.errors import DatasetError

__all__ = ["LOADER_CACHE_SIZE", "resolve_dir", "stat_signature"]

# Each cache entry holds a whole normalised dataset (CIFAR train alone is ~600 MiB as
# float32), so keep very few.
LOADER_CACHE_SIZE = 2


def resolve_dir(root: str | Path | None, env_var: str, default: Path | None) -> Path:
    """Pick the data directory: explicit ``root``, then ``env_var``, then ``default``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    from_env = os.environ.get(env_var, "")
    if from_env:
        return Path(from_env).expanduser()
    if default is not None:
        return default
    raise DatasetError(f"no data directory given: pass root=... (--data-root on the CLI) or set {env_var}")


def stat_signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """Identify file versions so a cache entry is dropped when a file is replaced."""
    signature = []
    for path in paths:
        stat = path.stat()
        signature.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)
