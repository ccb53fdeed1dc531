"""The in-memory dataset every loader returns, and the batches cut from it by indexing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitflower.errors import DatasetError

__all__ = ["ArrayDataset"]


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
