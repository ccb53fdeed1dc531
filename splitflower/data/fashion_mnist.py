"""Fashion-MNIST from its IDX files: Debian's `dataset-fashion-mnist`, or a directory the user gives."""

from __future__ import annotations

import functools
import gzip
import logging
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from splitflower.data._files import LOADER_CACHE_SIZE, resolve_dir, stat_signature
from splitflower.data.arrays import ArrayDataset
from splitflower.errors import DatasetError

__all__ = ["load_fashion_mnist"]

logger = logging.getLogger(__name__)

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


def _fashion_mnist_hint() -> str:
    return (
        "Install it with `apt-get install dataset-fashion-mnist` (which provides "
        f"{_FASHION_MNIST_DEFAULT_DIR}), or pass a directory holding the four IDX files "
        f"(root=..., or --data-root on the CLI) or set {_FASHION_MNIST_ENV} to one."
    )


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


@functools.lru_cache(maxsize=LOADER_CACHE_SIZE)
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
    directory = resolve_dir(root, _FASHION_MNIST_ENV, _FASHION_MNIST_DEFAULT_DIR)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise DatasetError(
            f"Fashion-MNIST directory '{directory}' {what}; expected it to hold "
            f"{', '.join(f'{n}[.gz]' for n in _FASHION_MNIST_FILES.values())}. "
            f"{_fashion_mnist_hint()}"
        )
    paths = [_find_idx_file(directory, stem) for stem in _FASHION_MNIST_FILES.values()]
    x_train, y_train, x_test, y_test = _fashion_mnist_tensors(stat_signature(paths))
    return (
        ArrayDataset(x_train, y_train, 10, "fashion-mnist"),
        ArrayDataset(x_test, y_test, 10, "fashion-mnist"),
    )
