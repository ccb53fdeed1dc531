"""A learnable synthetic classification task, for fast tests and smoke runs."""

from __future__ import annotations

import torch

from splitflower.data.arrays import ArrayDataset
from splitflower.errors import DatasetError

__all__ = ["synthetic"]

_SYNTHETIC_NOISE_STD = 0.5


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
