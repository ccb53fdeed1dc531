"""Reference models used by the split-learning experiments.

Every model is returned as an :class:`torch.nn.Sequential` whose top-level children
are the natural cut points, so that :func:`splitflower.split.split_model` can cut it
with a plain integer index. torchvision is deliberately not used: it is not a
dependency of splitflower.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from splitflower.errors import SplitflowerError

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "ModelSpecError",
    "UnknownModelError",
    "build_model",
    "lenet5",
    "residual_blocks",
    "resnet",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
]

logger = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = (
    "lenet5",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
)
"""Names accepted by :func:`build_model`."""

_STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)


class ModelSpecError(SplitflowerError, ValueError):
    """A model was requested with an invalid architecture parameter (e.g. depth).

    Examples
    --------
    >>> try:
    ...     resnet(21)
    ... except ModelSpecError as exc:
    ...     print("6n+2" in str(exc))
    True
    """


class UnknownModelError(ModelSpecError):
    """A model name is not one of :data:`MODEL_NAMES`.

    Examples
    --------
    >>> try:
    ...     build_model("vgg16", num_classes=10, in_channels=3, image_size=32)
    ... except UnknownModelError as exc:
    ...     print("resnet20" in str(exc))
    True
    """


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions (He et al., 2016, CIFAR variant).

    When the block changes the spatial size or the channel count, the shortcut is a
    1x1 convolution followed by batch norm (projection shortcut, "option B");
    otherwise it is the identity.

    Parameters
    ----------
    in_channels : int
        Channels of the block input.
    out_channels : int
        Channels of the block output.
    stride : int, default 1
        Stride of the first convolution and of the projection shortcut.

    Examples
    --------
    >>> block = BasicBlock(16, 32, stride=2)
    >>> block(torch.zeros(2, 16, 32, 32)).shape
    torch.Size([2, 32, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=1,
            bias=False,
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out: torch.Tensor = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu2(out + self.shortcut(x))
        return result


def _check_positive(name: str, value: int) -> None:
    # bool is an int subclass, but resnet(True) is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"{name} must be a positive integer, got {value!r}")


def residual_blocks(depth: int) -> int:
    """Return the number of residual blocks (3n) of a CIFAR ResNet of ``depth = 6n+2``.

    Raises
    ------
    ModelSpecError
        If ``depth`` is not of the form 6n+2 with n >= 1.

    Examples
    --------
    >>> residual_blocks(110)
    54
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ModelSpecError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}")
    return 3 * ((depth - 2) // 6)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def resnet(depth: int, *, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build the CIFAR-style ResNet of He et al. (2016), section 4.2.

    The result is an :class:`~torch.nn.Sequential` with children ``stem``,
    ``block0`` ... ``block{3n-1}`` and ``head``, so every residual-block boundary
    is an integer cut point. Any spatial input size works thanks to the adaptive
    average pool (e.g. 1x28x28 or 3x32x32).

    Parameters
    ----------
    depth : int
        Total depth 6n+2 (20, 32, 44, 56, 110, ...).
    num_classes : int, default 10
        Output logits.
    in_channels : int, default 3
        Channels of the input images.

    Raises
    ------
    ModelSpecError
        If ``depth`` is not 6n+2 or a size parameter is not positive.

    Examples
    --------
    >>> model = resnet(20)
    >>> len(model), model(torch.zeros(2, 3, 32, 32)).shape
    (11, torch.Size([2, 10]))
    """
    blocks = residual_blocks(depth)
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    per_stage = blocks // 3

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["stem"] = nn.Sequential(
        nn.Conv2d(in_channels, _STAGE_WIDTHS[0], kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(_STAGE_WIDTHS[0]),
        nn.ReLU(inplace=True),
    )
    channels = _STAGE_WIDTHS[0]
    index = 0
    for stage, width in enumerate(_STAGE_WIDTHS):
        for i in range(per_stage):
            stride = 2 if stage > 0 and i == 0 else 1
            layers[f"block{index}"] = BasicBlock(channels, width, stride=stride)
            channels = width
            index += 1
    layers["head"] = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )
    model = nn.Sequential(layers)
    _init_weights(model)
    logger.debug("built resnet%d with %d residual blocks", depth, blocks)
    return model


def resnet20(**kwargs: int) -> nn.Module:
    """ResNet-20 (9 residual blocks); keyword arguments go to :func:`resnet`."""
    return resnet(20, **kwargs)


def resnet32(**kwargs: int) -> nn.Module:
    """ResNet-32 (15 residual blocks); keyword arguments go to :func:`resnet`."""
    return resnet(32, **kwargs)


def resnet56(**kwargs: int) -> nn.Module:
    """ResNet-56 (27 residual blocks); keyword arguments go to :func:`resnet`."""
    return resnet(56, **kwargs)


def resnet110(**kwargs: int) -> nn.Module:
    """ResNet-110 (54 residual blocks); keyword arguments go to :func:`resnet`."""
    return resnet(110, **kwargs)


def lenet5(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Build LeNet-5 as used by the LocFedMix-SL paper.

    The result is an :class:`~torch.nn.Sequential` with children ``conv1``
    (conv 5x5 -> ReLU -> max-pool), ``conv2`` (same) and ``classifier``
    (flatten and three linear layers). 28x28 inputs get padding 2 in the first
    convolution, so 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs both reach a
    16x5x5 feature map.

    Parameters
    ----------
    num_classes : int, default 10
        Output logits.
    in_channels : int, default 1
        Channels of the input images.
    image_size : int, default 28
        Side of the (square) input images.

    Raises
    ------
    ModelSpecError
        If a parameter is not positive or the image is too small for two 5x5
        convolutions and two 2x2 poolings.

    Examples
    --------
    >>> lenet5()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> lenet5(in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    _check_positive("image_size", image_size)
    padding = 2 if image_size == 28 else 0
    side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
    if side < 1:
        raise ModelSpecError(f"lenet5 needs images of at least 14x14 pixels, got {image_size}")
    return nn.Sequential(
        OrderedDict(
            [
                (
                    "conv1",
                    nn.Sequential(
                        nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding),
                        nn.ReLU(inplace=True),
                        nn.MaxPool2d(2),
                    ),
                ),
                (
                    "conv2",
                    nn.Sequential(
                        nn.Conv2d(6, 16, kernel_size=5),
                        nn.ReLU(inplace=True),
                        nn.MaxPool2d(2),
                    ),
                ),
                (
                    "classifier",
                    nn.Sequential(
                        nn.Flatten(),
                        nn.Linear(16 * side * side, 120),
                        nn.ReLU(inplace=True),
                        nn.Linear(120, 84),
                        nn.ReLU(inplace=True),
                        nn.Linear(84, num_classes),
                    ),
                ),
            ]
        )
    )


_RESNET_DEPTHS: dict[str, int] = {
    "resnet20": 20,
    "resnet32": 32,
    "resnet56": 56,
    "resnet110": 110,
}


def build_model(name: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build a model of :data:`MODEL_NAMES` by name.

    ``image_size`` only matters for ``lenet5``; the ResNets adapt to any size.

    Raises
    ------
    UnknownModelError
        If ``name`` is not one of :data:`MODEL_NAMES` (case-insensitive).
    ModelSpecError
        If a size parameter is invalid.

    Examples
    --------
    >>> model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    >>> len(model)
    11
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    if key == "lenet5":
        return lenet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if key in _RESNET_DEPTHS:
        return resnet(_RESNET_DEPTHS[key], num_classes=num_classes, in_channels=in_channels)
    raise UnknownModelError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
