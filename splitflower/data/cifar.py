"""CIFAR-10 and CIFAR-100 from their pickled "python version" batches in a local directory
(they cannot be downloaded here), read by an unpickler that admits only numpy arrays."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitflower.data._files import LOADER_CACHE_SIZE, resolve_dir, stat_signature
from splitflower.data.arrays import ArrayDataset
from splitflower.errors import DatasetError

__all__ = ["load_cifar10", "load_cifar100"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _CifarFiles:
    """What tells one CIFAR variant's files and statistics apart."""

    name: str
    env_var: str
    subdir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR10 = _CifarFiles(
    name="CIFAR-10",
    env_var="SPLITFLOWER_CIFAR10",
    subdir="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
_CIFAR100 = _CifarFiles(
    name="CIFAR-100",
    env_var="SPLITFLOWER_CIFAR100",
    subdir="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE


# ``np.ndarray.__reduce__`` hands back numpy's own reconstructor, whichever private module
# the installed numpy keeps it in; using it avoids importing the deprecated
# ``numpy.core`` alias under numpy 2.
_NUMPY_RECONSTRUCT: Any = np.zeros(0).__reduce__()[0]


def _integer_scalar(dtype: Any, raw: Any) -> int:
    """What ``numpy.core.multiarray.scalar`` gives a pickled numpy integer (labels a script
    kept as ``list(rng.integers(...))``), as a Python int. Only an integer dtype and its raw
    bytes are accepted: numpy's own ``scalar`` would also build object and structured scalars."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iu" or not isinstance(raw, bytes):
        raise DatasetError(
            f"refusing to unpickle a numpy scalar of dtype {reprlib.repr(dtype)}: CIFAR batches may only "
            "hold numpy integer scalars"
        )
    if len(raw) != dtype.itemsize:
        raise DatasetError(f"a pickled numpy {dtype} scalar has {len(raw)} bytes, expected {dtype.itemsize}")
    return int(np.frombuffer(raw, dtype=dtype)[0])


_PICKLE_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _integer_scalar,
    ("numpy._core.multiarray", "scalar"): _integer_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals a CIFAR batch needs.

    Unpickling an arbitrary global is arbitrary code execution; refusing in
    ``find_class`` stops a crafted file before any of its callables is reached.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _PICKLE_ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise DatasetError(
                f"refusing to unpickle global '{module}.{name}': CIFAR batches may only "
                "reference numpy arrays and integer scalars (a batch re-saved from Python 3 must use "
                "pickle protocol 3 or 4, as the original files do)"
            )
        return allowed


def _unpickle_batch(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _RestrictedUnpickler(handle, encoding="bytes").load()
    except DatasetError as exc:
        raise DatasetError(f"'{path}': {exc}") from exc
    except Exception as exc:
        # A malformed pickle can fail in many ways (EOFError, UnpicklingError, numpy
        # errors...); all mean the same thing to the caller.
        raise DatasetError(f"'{path}' is not a valid CIFAR batch: {exc}") from exc


def _batch_field(batch: Any, key: str, path: Path) -> Any:
    if not isinstance(batch, dict):
        raise DatasetError(f"'{path}' holds a {type(batch).__name__}, expected a dict batch")
    # The official files were written by Python 2, so keys come back as bytes; accept
    # str too for batches re-pickled under Python 3.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DatasetError(f"'{path}' has no '{key}' entry (keys: {sorted(map(str, batch))})")


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_batch(path)
    data = _batch_field(batch, "data", path)
    labels_raw = _batch_field(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = f"{data.dtype} ndarray" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"'{path}': 'data' must be a uint8 numpy array, got {found}")
    if data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DatasetError(f"'{path}': 'data' has shape {data.shape}, expected (N, {_CIFAR_PIXELS})")
    labels = _cifar_labels(labels_raw, label_key, path)
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"'{path}' holds {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"'{path}': labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")
    return data, labels.astype(np.int64)


def _cifar_labels(raw: Any, label_key: str, path: Path) -> np.ndarray:
    """The labels as a 1-D integer array, unconverted: a float or nested label is refused, not
    truncated or flattened."""
    if isinstance(raw, np.ndarray):
        if raw.ndim == 1 and raw.dtype.kind in "iu":
            return raw
        found = f"a numpy array of dtype {raw.dtype} and shape {raw.shape}"
    elif isinstance(raw, list | tuple):
        odd = next((v for v in raw if type(v) is not int), None)  # a bool is no label
        if odd is None:
            # An object array: a Python int too large for int64 is still compared exactly.
            return np.array(raw, dtype=object) if raw else np.zeros(0, np.int64)
        found = f"a {type(raw).__name__} holding {type(odd).__name__} {reprlib.repr(odd)}"
    else:
        found = f"{type(raw).__name__} {reprlib.repr(raw)}"
    raise DatasetError(
        f"'{path}': '{label_key}' must be a list of ints or a 1-D integer numpy array, one label per image; got {found}"
    )


def _normalise_cifar(
    data: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    x = torch.from_numpy(data.astype(np.float32)).div_(255.0)
    x = x.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t).contiguous()


@functools.lru_cache(maxsize=LOADER_CACHE_SIZE)
def _cifar_tensors(
    signature: tuple[tuple[str, int, int], ...], files: _CifarFiles
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    paths = [Path(entry[0]) for entry in signature]
    logger.debug("unpickling %s from %s", files.name, paths[0].parent)
    splits: list[tuple[torch.Tensor, torch.Tensor]] = []
    train_count = len(files.train_files)
    for group in (paths[:train_count], paths[train_count:]):
        parts = [_read_cifar_batch(p, files.label_key, files.num_classes) for p in group]
        data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([lab for _, lab in parts])
        splits.append((_normalise_cifar(data, files.mean, files.std), torch.from_numpy(labels)))
    (x_train, y_train), (x_test, y_test) = splits
    return x_train, y_train, x_test, y_test


def _load_cifar(root: str | Path | None, files: _CifarFiles) -> tuple[ArrayDataset, ArrayDataset]:
    name, env_var, subdir = files.name, files.env_var, files.subdir
    expected = (*files.train_files, *files.test_files)
    hint = (
        f"{name} cannot be downloaded here: place the 'python version' batches "
        f"({', '.join(expected)}) in a directory and pass it as root=... (--data-root on the CLI) or set "
        f"{env_var} to it (the directory itself or its parent holding '{subdir}')."
    )
    if (root is None or str(root) == "") and not os.environ.get(env_var):
        raise DatasetError(f"no {name} directory given. {hint}")
    base = resolve_dir(root, env_var, None)
    candidates = (base, base / subdir)
    for directory in candidates:
        if all((directory / f).is_file() for f in expected):
            break
    else:
        details = "; ".join(
            f"in '{c}' missing: " + ", ".join(f for f in expected if not (c / f).is_file()) for c in candidates
        )
        raise DatasetError(f"{name} batch files not found ({details}). {hint}")
    paths = [directory / f for f in expected]
    x_train, y_train, x_test, y_test = _cifar_tensors(stat_signature(paths), files)
    return (
        ArrayDataset(x_train, y_train, files.num_classes, name.lower().replace("-", "")),
        ArrayDataset(x_test, y_test, files.num_classes, name.lower().replace("-", "")),
    )


def load_cifar10(root: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Load CIFAR-10 from its local pickled "python version" batches.

    ``root`` (else ``$SPLITFLOWER_CIFAR10``) is the folder holding ``data_batch_1`` ..
    ``data_batch_5`` and ``test_batch``, or its parent holding
    ``cifar-10-batches-py``. The pickles are read with an unpickler that only admits
    numpy array reconstruction. Results are cached per process and shared: do not
    modify the returned tensors in place.

    Parameters
    ----------
    root : str or Path, optional
        Directory of the batches or its parent.

    Returns
    -------
    tuple of ArrayDataset
        ``(train, test)`` of shape ``(3, 32, 32)`` per image, 10 classes, normalised
        per channel.

    Raises
    ------
    DatasetError
        If no directory is given, files are missing, or a batch is malformed or
        references a forbidden pickle global.
    """
    return _load_cifar(root, _CIFAR10)


def load_cifar100(root: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Load CIFAR-100 (fine labels) from its local pickled "python version" files.

    ``root`` (else ``$SPLITFLOWER_CIFAR100``) is the folder holding ``train`` and
    ``test``, or its parent holding ``cifar-100-python``. See :func:`load_cifar10`
    for the unpickling and caching rules.

    Parameters
    ----------
    root : str or Path, optional
        Directory of the files or its parent.

    Returns
    -------
    tuple of ArrayDataset
        ``(train, test)`` of shape ``(3, 32, 32)`` per image, 100 classes, normalised
        per channel.

    Raises
    ------
    DatasetError
        If no directory is given, files are missing, or a file is malformed or
        references a forbidden pickle global.
    """
    return _load_cifar(root, _CIFAR100)
