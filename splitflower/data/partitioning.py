"""Partitioning a dataset across clients (IID or Dirichlet) with flwr-datasets' partitioners:
only the labels and sample indices are handed to them, never the images."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch

from splitflower.data.arrays import ArrayDataset
from splitflower.errors import DatasetError

# ``datasets``/``flwr_datasets`` are imported lazily (in ``_compute_partition_indices``),
# always after this line runs; they read these at import time, and nothing may ever be
# fetched from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__all__ = ["PartitionSpec", "client_partition", "parse_partition", "partition", "partition_sizes"]

logger = logging.getLogger(__name__)

_PARTITION_CACHE_SIZE = 32  # partitions of different datasets, splits and seeds kept per process


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
    >>> from splitflower.data import synthetic
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
