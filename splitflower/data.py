"""In-memory datasets, offline loaders and federated partitioning for splitflower.

Every loader reads local files only: nothing is ever downloaded. A dataset is an
:class:`ArrayDataset`, a pair of tensors kept in memory, and minibatches are cut from it
by indexing rather than through ``torch.utils.data.DataLoader``: DataLoader workers fork,
and forking after a gRPC channel has been opened breaks gRPC in the child.

Partitioning across clients delegates to the partitioners of ``flwr-datasets``; only the
labels and sample indices are handed to them, never the images.

Example
-------
>>> from splitflower.data import load_dataset, client_partition
>>> train, test = load_dataset("synthetic", seed=0)
>>> shard = client_partition(train, partition_id=0, num_partitions=4, spec="iid")
>>> len(shard)
128
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import os
import pickle
import reprlib
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from splitflower.errors import DatasetError

# ``datasets``/``flwr_datasets`` are imported lazily (in ``_compute_partition_indices``),
# always after this line runs; they read these at import time, and nothing may ever be
# fetched from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "PartitionSpec",
    "client_partition",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_fashion_mnist",
    "parse_partition",
    "partition",
    "partition_sizes",
    "synthetic",
]

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "synthetic")
"""Names accepted by :func:`load_dataset`."""

_FASHION_MNIST_ENV = "SPLITFLOWER_FASHION_MNIST"
_FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_MNIST_MEAN = 0.2860
_FASHION_MNIST_STD = 0.3530
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_MNIST_SIDE = 28

_CIFAR10_ENV = "SPLITFLOWER_CIFAR10"
_CIFAR100_ENV = "SPLITFLOWER_CIFAR100"
_CIFAR10_SUBDIR = "cifar-10-batches-py"
_CIFAR100_SUBDIR = "cifar-100-python"
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILES = ("test_batch",)
_CIFAR100_TRAIN_FILES = ("train",)
_CIFAR100_TEST_FILES = ("test",)
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE

_SYNTHETIC_NOISE_STD = 0.5

# Each cache entry holds a whole normalised dataset (CIFAR train alone is ~600 MiB as
# float32), so keep very few.
_LOADER_CACHE_SIZE = 2
_PARTITION_CACHE_SIZE = 32

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


# --------------------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image classification dataset held in memory as two tensors.

    Loaders may share the underlying tensors between several ``ArrayDataset`` objects
    (they are cached per process, and :meth:`subset` / :meth:`batches` without
    shuffling may return views), so callers must treat ``images`` and ``labels`` as
    read-only: copy before modifying them in place.

    Parameters
    ----------
    images : torch.Tensor
        Floating-point images, shape ``(N, C, H, W)``, already normalised.
    labels : torch.Tensor
        ``int64`` class indices, shape ``(N,)``, each in ``[0, num_classes)``.
    num_classes : int
        Number of classes of the task (not necessarily all present in this dataset).
    name : str
        Human-readable name, e.g. ``"fashion-mnist"``.

    Equality is identity (comparing tensors element-wise has no single truth value).

    Raises
    ------
    DatasetError
        If the shapes, dtypes or label range are inconsistent.

    Examples
    --------
    >>> import torch
    >>> ds = ArrayDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]), 2, "toy")
    >>> len(ds), ds.input_shape
    (4, (1, 2, 2))
    >>> [tuple(x.shape) for x, _ in ds.batches(3, shuffle=False)]
    [(3, 1, 2, 2), (1, 1, 2, 2)]
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise DatasetError(
                f"{self.name}: images and labels must be torch.Tensor, got "
                f"{type(self.images).__name__} and {type(self.labels).__name__}"
            )
        if self.images.ndim != 4:
            raise DatasetError(f"{self.name}: images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if not self.images.is_floating_point():
            raise DatasetError(f"{self.name}: images must be floating point, got {self.images.dtype}")
        if self.labels.ndim != 1 or self.labels.dtype != torch.int64:
            raise DatasetError(
                f"{self.name}: labels must be a 1-D int64 tensor, got shape "
                f"{tuple(self.labels.shape)} and dtype {self.labels.dtype}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise DatasetError(f"{self.name}: num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise DatasetError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        if self.labels.numel() > 0:
            low = int(self.labels.min())
            high = int(self.labels.max())
            if low < 0 or high >= self.num_classes:
                raise DatasetError(
                    f"{self.name}: labels must lie in [0, {self.num_classes}), found values in [{low}, {high}]"
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        # The generated repr would print (truncated) tensor contents.
        return (
            f"ArrayDataset(name={self.name!r}, size={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one sample."""
        channels, height, width = self.images.shape[1:]
        return (int(channels), int(height), int(width))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ArrayDataset:
        """Return the samples at ``indices`` (in that order) as a new dataset.

        Parameters
        ----------
        indices : Sequence[int] or torch.Tensor
            Integer positions in ``[0, len(self))``; repeats are allowed.

        Returns
        -------
        ArrayDataset
            A dataset with copied tensors, the same ``num_classes`` and ``name``.

        Raises
        ------
        DatasetError
            If an index is out of range or not an integer.
        """
        index = _as_index_tensor(indices, len(self), self.name)
        return ArrayDataset(
            images=self.images[index],
            labels=self.labels[index],
            num_classes=self.num_classes,
            name=self.name,
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` minibatches covering the dataset once.

        Parameters
        ----------
        batch_size : int
            Samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle : bool
            Visit samples in a random order drawn from ``generator``.
        generator : torch.Generator, optional
            Source of randomness for shuffling; seed it for reproducible epochs.
        drop_last : bool, default False
            Skip the final batch when it has fewer than ``batch_size`` samples.

        Yields
        ------
        tuple of torch.Tensor
            Images ``(B, C, H, W)`` and labels ``(B,)``. Without shuffling these are
            views of the dataset's tensors and must not be modified in place.

        Raises
        ------
        DatasetError
            If ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise DatasetError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        return self._iter_batches(batch_size, shuffle, generator, drop_last)

    def _iter_batches(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
        drop_last: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Separate from ``batches`` so argument errors surface at the call, not at the
        # first ``next()``.
        total = len(self)
        order = torch.randperm(total, generator=generator) if shuffle else None
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            if drop_last and stop - start < batch_size:
                return
            if order is None:
                yield self.images[start:stop], self.labels[start:stop]
            else:
                chunk = order[start:stop]
                yield self.images[chunk], self.labels[chunk]


def _as_index_tensor(indices: Sequence[int] | torch.Tensor | np.ndarray, size: int, name: str) -> torch.Tensor:
    """Convert ``indices`` to a 1-D int64 tensor and check they lie in ``[0, size)``."""
    try:
        index = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DatasetError(f"{name}: indices are not a sequence of ints: {exc}") from exc
    if index.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise DatasetError(f"{name}: indices must be integers, got dtype {index.dtype}")
    index = index.reshape(-1).to(torch.int64)
    low = int(index.min())
    high = int(index.max())
    if low < 0 or high >= size:
        raise DatasetError(f"{name}: indices must lie in [0, {size}), found values in [{low}, {high}]")
    return index


# --------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------


def _fashion_mnist_hint() -> str:
    return (
        "Install it with `apt-get install dataset-fashion-mnist` (which provides "
        f"{_FASHION_MNIST_DEFAULT_DIR}), or pass a directory holding the four IDX files "
        f"(root=..., or --data-root on the CLI) or set {_FASHION_MNIST_ENV} to one."
    )


def _resolve_dir(root: str | Path | None, env_var: str, default: Path | None) -> Path:
    """Pick the data directory: explicit ``root``, then ``env_var``, then ``default``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    from_env = os.environ.get(env_var, "")
    if from_env:
        return Path(from_env).expanduser()
    if default is not None:
        return default
    raise DatasetError(f"no data directory given: pass root=... (--data-root on the CLI) or set {env_var}")


def _find_idx_file(directory: Path, stem: str) -> Path:
    """Return ``directory/stem`` or ``directory/stem.gz``, preferring the raw file."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"Fashion-MNIST file '{stem}' (or '{stem}.gz') is missing in directory '{directory}'. {_fashion_mnist_hint()}"
    )


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read '{path}': {exc}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"'{path}' is not a valid gzip file: {exc}") from exc


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes into an array of its declared shape.

    Raises
    ------
    DatasetError
        If the magic number, header or payload length is wrong.
    """
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetError(f"'{path}' is truncated: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetError(
            f"'{path}' has IDX magic number 0x{magic:08x}, expected "
            f"0x{expected_magic:08x}; the file is corrupt or not this kind of IDX file"
        )
    ndim = expected_magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"'{path}' is truncated: {len(data)} bytes, the IDX header alone needs {header_len}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = math.prod(dims)
    payload = len(data) - header_len
    if payload != expected_bytes:
        problem = "truncated" if payload < expected_bytes else "too long"
        raise DatasetError(
            f"'{path}' is {problem}: header declares dimensions {dims} "
            f"({expected_bytes} bytes of data) but the file holds {payload}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != (_MNIST_SIDE, _MNIST_SIDE):
        raise DatasetError(
            f"'{images_path}' holds images of size {images.shape[1:]}, expected ({_MNIST_SIDE}, {_MNIST_SIDE})"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"'{images_path}' holds {images.shape[0]} images but '{labels_path}' holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DatasetError(f"'{labels_path}' holds label {int(labels.max())}; Fashion-MNIST has 10 classes")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    x = x.sub_(_FASHION_MNIST_MEAN).div_(_FASHION_MNIST_STD).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x.contiguous(), y


def _stat_signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """Identify file versions so a cache entry is dropped when a file is replaced."""
    signature = []
    for path in paths:
        stat = path.stat()
        signature.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


@functools.lru_cache(maxsize=_LOADER_CACHE_SIZE)
def _fashion_mnist_tensors(
    signature: tuple[tuple[str, int, int], ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train_images, train_labels, test_images, test_labels = (Path(entry[0]) for entry in signature)
    logger.debug("parsing Fashion-MNIST from %s", train_images.parent)
    x_train, y_train = _load_idx_pair(train_images, train_labels)
    x_test, y_test = _load_idx_pair(test_images, test_labels)
    return x_train, y_train, x_test, y_test


def load_fashion_mnist(
    root: str | Path | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load Fashion-MNIST from local IDX files.

    The directory is ``root`` if given, else ``$SPLITFLOWER_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). Each
    of the four files may be raw or gzip-compressed. Parsed tensors are cached per
    process (simulation actors load the data once per virtual client), so the returned
    datasets share memory with that cache and must not be modified in place.

    Parameters
    ----------
    root : str or Path, optional
        Directory holding ``train-images-idx3-ubyte[.gz]``,
        ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
        ``t10k-labels-idx1-ubyte[.gz]``.

    Returns
    -------
    tuple of ArrayDataset
        ``(train, test)``: 60000 and 10000 images of shape ``(1, 28, 28)``, normalised
        with mean 0.2860 and std 0.3530, 10 classes.

    Raises
    ------
    DatasetError
        If the directory or a file is missing, or a file is malformed.
    """
    directory = _resolve_dir(root, _FASHION_MNIST_ENV, _FASHION_MNIST_DEFAULT_DIR)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise DatasetError(
            f"Fashion-MNIST directory '{directory}' {what}; expected it to hold "
            f"{', '.join(f'{n}[.gz]' for n in _FASHION_MNIST_FILES.values())}. "
            f"{_fashion_mnist_hint()}"
        )
    paths = [_find_idx_file(directory, stem) for stem in _FASHION_MNIST_FILES.values()]
    x_train, y_train, x_test, y_test = _fashion_mnist_tensors(_stat_signature(paths))
    return (
        ArrayDataset(x_train, y_train, 10, "fashion-mnist"),
        ArrayDataset(x_test, y_test, 10, "fashion-mnist"),
    )


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (pickled "python version" batches)
# --------------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=_LOADER_CACHE_SIZE)
def _cifar_tensors(
    signature: tuple[tuple[str, int, int], ...],
    num_train_files: int,
    label_key: str,
    num_classes: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    paths = [Path(entry[0]) for entry in signature]
    logger.debug("unpickling CIFAR-%d from %s", num_classes, paths[0].parent)
    splits: list[tuple[torch.Tensor, torch.Tensor]] = []
    for group in (paths[:num_train_files], paths[num_train_files:]):
        parts = [_read_cifar_batch(p, label_key, num_classes) for p in group]
        data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([lab for _, lab in parts])
        splits.append((_normalise_cifar(data, mean, std), torch.from_numpy(labels)))
    (x_train, y_train), (x_test, y_test) = splits
    return x_train, y_train, x_test, y_test


def _load_cifar(
    root: str | Path | None,
    *,
    env_var: str,
    subdir: str,
    train_files: tuple[str, ...],
    test_files: tuple[str, ...],
    label_key: str,
    num_classes: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    name: str,
) -> tuple[ArrayDataset, ArrayDataset]:
    expected = (*train_files, *test_files)
    hint = (
        f"{name} cannot be downloaded here: place the 'python version' batches "
        f"({', '.join(expected)}) in a directory and pass it as root=... (--data-root on the CLI) or set "
        f"{env_var} to it (the directory itself or its parent holding '{subdir}')."
    )
    if (root is None or str(root) == "") and not os.environ.get(env_var):
        raise DatasetError(f"no {name} directory given. {hint}")
    base = _resolve_dir(root, env_var, None)
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
    x_train, y_train, x_test, y_test = _cifar_tensors(
        _stat_signature(paths), len(train_files), label_key, num_classes, mean, std
    )
    return (
        ArrayDataset(x_train, y_train, num_classes, name.lower().replace("-", "")),
        ArrayDataset(x_test, y_test, num_classes, name.lower().replace("-", "")),
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
    return _load_cifar(
        root,
        env_var=_CIFAR10_ENV,
        subdir=_CIFAR10_SUBDIR,
        train_files=_CIFAR10_TRAIN_FILES,
        test_files=_CIFAR10_TEST_FILES,
        label_key="labels",
        num_classes=10,
        mean=_CIFAR10_MEAN,
        std=_CIFAR10_STD,
        name="CIFAR-10",
    )


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
    return _load_cifar(
        root,
        env_var=_CIFAR100_ENV,
        subdir=_CIFAR100_SUBDIR,
        train_files=_CIFAR100_TRAIN_FILES,
        test_files=_CIFAR100_TEST_FILES,
        label_key="fine_labels",
        num_classes=100,
        mean=_CIFAR100_MEAN,
        std=_CIFAR100_STD,
        name="CIFAR-100",
    )


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------


def synthetic(
    num_train: int = 512,
    num_test: int = 256,
    *,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    seed: int = 0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Build a learnable synthetic classification task, deterministic for ``seed``.

    Each class has a fixed random prototype image (standard normal pixels); a sample
    is its class prototype plus gaussian noise of std 0.5.

    Parameters
    ----------
    num_train, num_test : int
        Number of training and test samples.
    num_classes : int, default 10
        Number of classes.
    input_shape : tuple of int, default (1, 28, 28)
        ``(C, H, W)`` of each sample.
    seed : int, default 0
        Seed of the prototypes, labels and noise.

    Returns
    -------
    tuple of ArrayDataset
        ``(train, test)`` named ``"synthetic"``.

    Raises
    ------
    DatasetError
        If a size or the shape is not positive.

    Examples
    --------
    >>> train, test = synthetic(64, 32, num_classes=4, input_shape=(3, 8, 8), seed=1)
    >>> len(train), train.input_shape, train.num_classes
    (64, (3, 8, 8), 4)
    """
    for label, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DatasetError(f"{label} must be a non-negative int, got {value!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise DatasetError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise DatasetError(f"num_classes must be >= 1, got {num_classes}")
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise DatasetError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    shape = tuple(int(d) for d in input_shape)
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn((num_classes, *shape), generator=generator)

    def draw(count: int) -> ArrayDataset:
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        noise = torch.randn((count, *shape), generator=generator)
        images = prototypes[labels] + _SYNTHETIC_NOISE_STD * noise
        return ArrayDataset(images, labels, num_classes, "synthetic")

    train = draw(num_train)
    test = draw(num_test)
    return train, test


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def load_dataset(name: str, *, root: str | Path | None = None, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES` (case-insensitive).
    root : str or Path, optional
        Data directory for the file-based datasets; ignored by ``"synthetic"``.
    seed : int, default 0
        Seed of the ``"synthetic"`` dataset; ignored by the others.

    Returns
    -------
    tuple of ArrayDataset
        ``(train, test)``.

    Raises
    ------
    DatasetError
        If the name is unknown or the loader fails.

    Examples
    --------
    >>> train, test = load_dataset("synthetic", seed=3)
    >>> train.name
    'synthetic'
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "fashion-mnist":
        return load_fashion_mnist(root)
    if key == "cifar10":
        return load_cifar10(root)
    if key == "cifar100":
        return load_cifar100(root)
    if key == "synthetic":
        return synthetic(seed=seed)
    raise DatasetError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}")


# --------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionSpec:
    """How a dataset is split across clients.

    Parameters
    ----------
    kind : {"iid", "dirichlet"}
        ``"iid"``: uniformly random, near-equal shards. ``"dirichlet"``: label skew
        drawn from a Dirichlet distribution of concentration ``alpha`` (smaller is
        more skewed).
    alpha : float or None
        Concentration for ``"dirichlet"`` (positive, finite); ``None`` for ``"iid"``.

    Raises
    ------
    DatasetError
        If ``kind`` and ``alpha`` do not fit together.

    Examples
    --------
    >>> parse_partition("dirichlet:0.5")
    PartitionSpec(kind='dirichlet', alpha=0.5)
    >>> str(PartitionSpec("iid"))
    'iid'
    """

    kind: Literal["iid", "dirichlet"]
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "iid":
            if self.alpha is not None:
                raise DatasetError(f"an iid partition takes no alpha, got {self.alpha}")
        elif self.kind == "dirichlet":
            if (
                self.alpha is None
                or isinstance(self.alpha, bool)
                or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha)
                or self.alpha <= 0
            ):
                raise DatasetError(f"a dirichlet partition needs a positive finite alpha, got {self.alpha!r}")
        else:
            raise DatasetError(f"partition kind must be 'iid' or 'dirichlet', got {self.kind!r}")

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha}"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``"iid"`` or ``"dirichlet:ALPHA"`` into a :class:`PartitionSpec`.

    Parameters
    ----------
    spec : str
        The textual form, e.g. from a CLI flag or run config; case and surrounding
        whitespace are ignored.

    Returns
    -------
    PartitionSpec

    Raises
    ------
    DatasetError
        If ``spec`` is not one of the two forms or ALPHA is not a positive number.
    """
    expected = "expected 'iid' or 'dirichlet:ALPHA' with ALPHA a positive number"
    if not isinstance(spec, str):
        raise DatasetError(f"bad partition spec {spec!r}: {expected}")
    text = spec.strip().lower()
    if text == "iid":
        return PartitionSpec("iid")
    kind, sep, value = text.partition(":")
    if kind.strip() != "dirichlet" or not sep:
        raise DatasetError(f"bad partition spec {spec!r}: {expected}")
    try:
        alpha = float(value)
    except ValueError:
        raise DatasetError(f"bad partition spec {spec!r}: {expected}") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise DatasetError(f"bad partition spec {spec!r}: {expected}")
    return PartitionSpec("dirichlet", alpha)


_partition_cache: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, ...]] = OrderedDict()
_partition_cache_lock = threading.Lock()


def _partition_indices(
    labels: torch.Tensor, num_partitions: int, spec: PartitionSpec, seed: int
) -> tuple[torch.Tensor, ...]:
    """Return, per partition, the dataset positions assigned to it (cached)."""
    # Keyed on the label contents rather than object identity: every virtual client
    # reloads the dataset into a fresh object, and ids can be reused after collection.
    label_bytes = labels.detach().cpu().numpy().tobytes()
    digest = hashlib.sha1(label_bytes, usedforsecurity=False).hexdigest()
    key = (digest, int(labels.shape[0]), num_partitions, spec, seed)
    with _partition_cache_lock:
        cached = _partition_cache.get(key)
        if cached is not None:
            _partition_cache.move_to_end(key)
            return cached
    result = _compute_partition_indices(labels, num_partitions, spec, seed)
    with _partition_cache_lock:
        _partition_cache[key] = result
        while len(_partition_cache) > _PARTITION_CACHE_SIZE:
            _partition_cache.popitem(last=False)
    return result


def _compute_partition_indices(
    labels: torch.Tensor, num_partitions: int, spec: PartitionSpec, seed: int
) -> tuple[torch.Tensor, ...]:
    # Imported here: ``datasets`` is slow to import and only partitioning needs it.
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
    )

    size = int(labels.shape[0])
    # IidPartitioner cuts contiguous shards, which is only IID if the rows are in
    # random order, so the rows are permuted (by ``seed``) before they are handed over.
    order = np.random.default_rng(seed).permutation(size)
    hf_dataset = datasets.Dataset.from_dict(
        {"label": labels.detach().cpu().numpy()[order], "idx": order.astype(np.int64)}
    )
    partitioner: Partitioner
    if spec.kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        # min_partition_size=1: small (test, synthetic) datasets cannot satisfy the
        # default of 10 per client, but an empty client cannot train at all. The
        # partitioner resamples up to 10 times to meet it, then gives up.
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(cast(float, spec.alpha)),
            min_partition_size=1,
            seed=seed,
        )
    partitioner.dataset = hf_dataset
    result: list[torch.Tensor] = []
    with warnings.catch_warnings():
        # Each Dirichlet resampling warns; the outcome is reported below instead.
        warnings.simplefilter("ignore", UserWarning)
        try:
            for partition_id in range(num_partitions):
                part = partitioner.load_partition(partition_id)
                # Slice first: ``part["idx"]`` is a lazy per-row Column in datasets 4,
                # ~100x slower to materialise than one numpy-formatted batch.
                idx = np.asarray(part.with_format("numpy")[:]["idx"], dtype=np.int64)
                result.append(torch.from_numpy(idx.copy()))
        except ValueError as exc:
            raise DatasetError(
                f"could not partition {size} samples into {num_partitions} non-empty "
                f"'{spec}' partitions ({exc}); use a larger alpha or fewer partitions"
            ) from exc
    logger.debug(
        "partitioned %d samples into %d '%s' partitions (seed %d), sizes %s",
        size,
        num_partitions,
        spec,
        seed,
        [int(r.numel()) for r in result],
    )
    return tuple(result)


def _validate_partitioning(dataset: ArrayDataset, num_partitions: int, spec: PartitionSpec | str) -> PartitionSpec:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
        raise DatasetError(f"num_partitions must be an int, got {num_partitions!r}")
    if num_partitions < 1 or num_partitions > len(dataset):
        raise DatasetError(f"num_partitions must lie in [1, {len(dataset)}] (the dataset size), got {num_partitions}")
    if isinstance(spec, PartitionSpec):
        return spec
    return parse_partition(spec)


def partition(
    dataset: ArrayDataset,
    num_partitions: int,
    spec: PartitionSpec | str,
    *,
    seed: int = 0,
) -> list[ArrayDataset]:
    """Split ``dataset`` into ``num_partitions`` disjoint client datasets.

    Uses ``flwr_datasets``' :class:`IidPartitioner` or :class:`DirichletPartitioner`
    on the labels only. Every sample lands in exactly one partition. Dirichlet
    partitions are resampled until each holds at least one sample (see
    :class:`DirichletPartitioner`'s ``min_partition_size``). Index lists are cached
    per process, keyed on the label contents, ``num_partitions``, ``spec`` and
    ``seed``.

    Parameters
    ----------
    dataset : ArrayDataset
        The dataset to split.
    num_partitions : int
        Number of partitions, in ``[1, len(dataset)]``.
    spec : PartitionSpec or str
        ``"iid"``, ``"dirichlet:ALPHA"`` or a parsed :class:`PartitionSpec`.
    seed : int, default 0
        Seed of the shuffling and Dirichlet sampling.

    Returns
    -------
    list of ArrayDataset
        One dataset per partition id.

    Raises
    ------
    DatasetError
        If the arguments are invalid or no valid Dirichlet split was found.
    """
    parsed = _validate_partitioning(dataset, num_partitions, spec)
    indices = _partition_indices(dataset.labels, num_partitions, parsed, seed)
    return [dataset.subset(index) for index in indices]


def partition_sizes(
    dataset: ArrayDataset, num_partitions: int, spec: PartitionSpec | str, *, seed: int = 0
) -> list[int]:
    """How many samples each partition of :func:`partition`'s split holds, without copying
    any (the index lists are cached for the clients that follow).

    Example
    -------
    >>> partition_sizes(synthetic(10, 4)[0], 3, "iid")
    [4, 3, 3]

    Raises
    ------
    DatasetError
        As :func:`partition` does.
    """
    parsed = _validate_partitioning(dataset, num_partitions, spec)
    return [len(index) for index in _partition_indices(dataset.labels, num_partitions, parsed, seed)]


def client_partition(
    dataset: ArrayDataset,
    partition_id: int,
    num_partitions: int,
    spec: PartitionSpec | str,
    seed: int = 0,
) -> ArrayDataset:
    """Return partition ``partition_id`` of :func:`partition`'s split.

    Parameters
    ----------
    dataset : ArrayDataset
        The dataset to split.
    partition_id : int
        Which partition, in ``[0, num_partitions)``.
    num_partitions : int
        Number of partitions, in ``[1, len(dataset)]``.
    spec : PartitionSpec or str
        ``"iid"``, ``"dirichlet:ALPHA"`` or a parsed :class:`PartitionSpec`.
    seed : int, default 0
        Seed of the split; every client must use the same one.

    Returns
    -------
    ArrayDataset
        The samples of that partition.

    Raises
    ------
    DatasetError
        If ``partition_id`` is out of range or the other arguments are invalid.
    """
    parsed = _validate_partitioning(dataset, num_partitions, spec)
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        raise DatasetError(
            f"partition_id must be an int in [0, {num_partitions}) for "
            f"{num_partitions} partitions, got {partition_id!r}"
        )
    indices = _partition_indices(dataset.labels, num_partitions, parsed, seed)
    return dataset.subset(indices[partition_id])
