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

from collections.abc import Callable
from pathlib import Path

from splitflower.data.arrays import ArrayDataset
from splitflower.data.cifar import load_cifar10, load_cifar100
from splitflower.data.fashion_mnist import load_fashion_mnist
from splitflower.data.partitioning import PartitionSpec, client_partition, parse_partition, partition, partition_sizes
from splitflower.data.synthetic_data import synthetic
from splitflower.errors import DatasetError

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

# name -> loader of (root, seed): the file-based datasets ignore the seed, "synthetic" the root
_LOADERS: dict[str, Callable[[str | Path | None, int], tuple[ArrayDataset, ArrayDataset]]] = {
    "fashion-mnist": lambda root, _: load_fashion_mnist(root),
    "cifar10": lambda root, _: load_cifar10(root),
    "cifar100": lambda root, _: load_cifar100(root),
    "synthetic": lambda _, seed: synthetic(seed=seed),
}

DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)
"""Names accepted by :func:`load_dataset`."""


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
    loader = _LOADERS.get(name.strip().lower()) if isinstance(name, str) else None
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}")
    return loader(root, seed)
