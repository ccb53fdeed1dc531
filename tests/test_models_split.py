"""Tests of splitflower.models and splitflower.split."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import fx, nn

from splitflower.errors import SplitError
from splitflower.models import (
    MODEL_NAMES,
    ModelSpecError,
    UnknownModelError,
    build_model,
    lenet5,
    residual_blocks,
    resnet,
    resnet20,
    resnet110,
)
from splitflower.split import (
    client_blocks_for_cut,
    cut_shape,
    split_for_cut,
    split_model,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class _TvBasicBlock(nn.Module):
    """torchvision-style block: one shared ReLU and an in-place skip addition."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyTorchvisionLikeResNet(nn.Module):
    """Miniature of torchvision's ResNet-18: a forward that is not a plain chain."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(_TvBasicBlock(8, 8), _TvBasicBlock(8, 8))
        self.layer2 = nn.Sequential(_TvBasicBlock(8, 16, stride=2), _TvBasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.sum() > 0:
            x = -x
        return self.b(x)


def _randomize_bn(model: nn.Module) -> nn.Module:
    # Non-trivial running statistics make sure buffers really travel with the halves.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model


def _child(module: nn.Module, name: str) -> nn.Module:
    child = getattr(module, name)
    assert isinstance(child, nn.Module), f"{name} is not a submodule"
    return child


def _len(module: nn.Module) -> int:
    assert isinstance(module, nn.Sequential), f"expected a Sequential, got {type(module).__name__}"
    return len(module)


def _nested() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("layer1", nn.Linear(4, 8)),
                ("layer2", nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6))),
                ("layer3", nn.Sequential(nn.ReLU(), nn.Linear(6, 3))),
            ]
        )
    )


def _check_composes(model: nn.Module, bottom: nn.Module, top: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    bottom.eval()
    top.eval()
    with torch.no_grad():
        torch.testing.assert_close(top(bottom(x)), model(x))


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(("depth", "blocks"), [(20, 9), (32, 15), (56, 27), (110, 54)])
def test_resnet_has_3n_residual_blocks(depth: int, blocks: int) -> None:
    model = resnet(depth)
    assert residual_blocks(depth) == blocks
    names = [name for name, _ in model.named_children()]
    assert names == ["stem", *(f"block{i}" for i in range(blocks)), "head"]


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_resnet_output_shape(depth: int, channels: int, size: int) -> None:
    model = resnet(depth, num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("depth", [0, 7, 19, 21, 111, -4])
def test_resnet_rejects_bad_depth(depth: int) -> None:
    with pytest.raises(ModelSpecError, match=r"6n\+2") as info:
        resnet(depth)
    assert str(depth) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_build_model_names() -> None:
    for name in MODEL_NAMES:
        channels, size = (1, 28) if name == "lenet5" else (3, 32)
        model = build_model(name, num_classes=5, in_channels=channels, image_size=size)
        assert isinstance(model, nn.Sequential)
    with pytest.raises(UnknownModelError, match="resnet110") as info:
        build_model("vgg16", num_classes=10, in_channels=3, image_size=32)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_lenet5_shapes(channels: int, size: int) -> None:
    model = lenet5(num_classes=10, in_channels=channels, image_size=size).eval()
    assert [name for name, _ in model.named_children()] == [
        "conv1",
        "conv2",
        "classifier",
    ]
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert _child(model, "conv2")(_child(model, "conv1")(x)).shape == (2, 16, 5, 5)
        assert model(x).shape == (2, 10)


# ----------------------------------------------------------------- split_model


def test_split_at_every_int() -> None:
    model = _randomize_bn(resnet20())
    x = torch.randn(2, 3, 32, 32)
    for at in range(1, _len(model)):
        bottom, top = split_model(model, at)
        assert _len(bottom) == at
        assert _len(top) == _len(model) - at
        _check_composes(model, bottom, top, x)


@pytest.mark.parametrize("at", [0, 3, -1, 10])
def test_split_int_out_of_range(at: int) -> None:
    with pytest.raises(SplitError, match=r"1\.\.2") as info:
        split_model(lenet5(), at)
    assert str(at) in str(info.value)


def test_a_lenet5_cut_out_of_range_names_its_parts_and_the_named_cuts() -> None:
    with pytest.raises(SplitError, match=r"lenet5 has 3 parts \(conv1, conv2, classifier\).*got 999; or use 's'"):
        split_for_cut("lenet5", lenet5(), 999)


def test_split_int_needs_sequential() -> None:
    with pytest.raises(SplitError, match=r"nn\.Sequential"):
        split_model(TinyTorchvisionLikeResNet(), 2)


@pytest.mark.parametrize("at", ["layer1", "layer2.0", "layer2.1", "layer2.2", "layer3.0"])
def test_split_nested_sequential(at: str) -> None:
    model = _nested()
    bottom, top = split_model(model, at)
    _check_composes(model, bottom, top, torch.randn(5, 4))
    # Names survive the cut, so the halves' state dicts partition the original one.
    keys = set(bottom.state_dict()) | set(top.state_dict())
    assert keys == set(model.state_dict())
    assert not set(bottom.state_dict()) & set(top.state_dict())


def test_split_nested_sequential_structure() -> None:
    bottom, top = split_model(_nested(), "layer2.1")
    assert isinstance(bottom, nn.Sequential)
    assert isinstance(top, nn.Sequential)
    assert [name for name, _ in bottom.named_children()] == ["layer1", "layer2"]
    assert _len(_child(bottom, "layer2")) == 2
    assert _len(_child(top, "layer2")) == 1
    assert [name for name, _ in top.named_children()] == ["layer2", "layer3"]


@pytest.mark.parametrize("at", ["layer1", "layer2", "avgpool", "layer1.1", "maxpool"])
def test_split_non_sequential(at: str) -> None:
    model = _randomize_bn(TinyTorchvisionLikeResNet())
    bottom, top = split_model(model, at)
    assert isinstance(bottom, fx.GraphModule)
    assert isinstance(top, fx.GraphModule)
    _check_composes(model, bottom, top, torch.randn(3, 3, 16, 16))


def test_split_non_sequential_cut_shapes() -> None:
    model = TinyTorchvisionLikeResNet()
    assert cut_shape(split_model(model, "layer2")[0], (3, 16, 16)) == (16, 4, 4)
    assert cut_shape(split_model(model, "avgpool")[0], (3, 16, 16)) == (16, 1, 1)


def test_split_inside_skip_connection_is_rejected() -> None:
    with pytest.raises(SplitError, match="crossing values") as info:
        split_model(TinyTorchvisionLikeResNet(), "layer1.0.conv1")
    assert "'layer1.0'" in str(info.value)


def test_split_unknown_segment() -> None:
    with pytest.raises(SplitError, match="'layer9'") as info:
        split_model(TinyTorchvisionLikeResNet(), "layer9.1")
    message = str(info.value)
    assert "'layer9.1'" in message
    assert "conv1, bn1" in message
    assert "fc" in message
    with pytest.raises(SplitError, match=r"no submodule '5' in 'layer2'"):
        split_model(_nested(), "layer2.5")


@pytest.mark.parametrize(
    ("model", "at"),
    [
        (TinyTorchvisionLikeResNet(), "fc"),
        (resnet20(), "head"),
        (resnet20(), "head.2"),
        (_nested(), "layer3.1"),
        (_nested(), ""),
        (_nested(), "  "),
        (_nested(), "layer2..1"),
    ],
)
def test_split_leaves_nothing_or_bad_path(model: nn.Module, at: str) -> None:
    with pytest.raises(SplitError):
        split_model(model, at)


def test_split_untraceable_model() -> None:
    with pytest.raises(SplitError, match="trace"):
        split_model(_DataDependent(), "a")


def test_split_does_not_touch_callers_model() -> None:
    for model, at in [(TinyTorchvisionLikeResNet(), "layer1"), (_nested(), "layer2.1")]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        structure = [(name, id(m)) for name, m in model.named_modules()]
        bottom, top = split_model(model, at)
        assert [(name, id(m)) for name, m in model.named_modules()] == structure
        after = model.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            torch.testing.assert_close(after[key], value)
        # Independent copies: no parameter storage is shared with anyone.
        own = {p.data_ptr() for p in model.parameters()}
        low = {p.data_ptr() for p in bottom.parameters()}
        high = {p.data_ptr() for p in top.parameters()}
        assert not own & low
        assert not own & high
        assert not low & high


def test_split_keeps_training_flags() -> None:
    model = _nested().eval()
    bottom, top = split_model(model, "layer2.1")
    assert not any(m.training for m in [*bottom.modules(), *top.modules()])
    bottom, top = split_model(TinyTorchvisionLikeResNet().train(), "layer1")
    assert bottom.training
    assert top.training


@pytest.mark.parametrize(
    ("model", "at", "shape"),
    [
        (TinyTorchvisionLikeResNet(), "layer1", (2, 3, 16, 16)),
        (resnet20(), 4, (2, 3, 32, 32)),
        (_nested(), "layer2.1", (2, 4)),
    ],
)
def test_split_gradients_flow(model: nn.Module, at: int | str, shape: tuple[int, ...]) -> None:
    bottom, top = split_model(model, at)
    top(bottom(torch.randn(shape))).sum().backward()
    for half in (bottom, top):
        params = list(half.parameters())
        assert params
        assert all(p.grad is not None for p in params)


# ---------------------------------------------------------------- paper cuts


@pytest.mark.parametrize(
    ("depth", "cut", "blocks"),
    [
        (110, "s", 12),
        (110, "m", 17),
        (110, "d", 26),
        (20, "s", 2),
        (20, "m", 3),
        (20, "D", 4),
    ],
)
def test_client_blocks_for_cut(depth: int, cut: str, blocks: int) -> None:
    assert client_blocks_for_cut(depth, cut) == blocks


def test_client_blocks_for_cut_validation() -> None:
    assert client_blocks_for_cut(20, 8) == 8
    for bad in (0, 9, -1):
        with pytest.raises(SplitError, match=r"1\.\.8"):
            client_blocks_for_cut(20, bad)
    with pytest.raises(SplitError, match="s, m, d"):
        client_blocks_for_cut(20, "x")
    with pytest.raises(ModelSpecError):
        client_blocks_for_cut(21, "s")


@pytest.mark.parametrize(("name", "cut"), [("resnet20", "m"), ("resnet110", "s"), ("resnet20", 5)])
def test_split_for_cut_resnet(name: str, cut: str | int) -> None:
    model = _randomize_bn(build_model(name, num_classes=10, in_channels=3, image_size=32))
    bottom, top = split_for_cut(name, model, cut)
    depth = int(name.removeprefix("resnet"))
    assert _len(bottom) == 1 + client_blocks_for_cut(depth, cut)
    _check_composes(model, bottom, top, torch.randn(2, 3, 32, 32))


def test_split_for_cut_resnet110_sizes() -> None:
    model = resnet110()
    for cut, blocks in (("s", 12), ("m", 17), ("d", 26)):
        bottom, top = split_for_cut("resnet110", model, cut)
        assert _len(bottom) == 1 + blocks
        assert _len(top) == 54 - blocks + 1


def test_split_for_cut_rejects_mismatch() -> None:
    with pytest.raises(SplitError, match="resnet56"):
        split_for_cut("resnet56", resnet20(), "s")
    with pytest.raises(UnknownModelError):
        split_for_cut("vgg16", resnet20(), "s")


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_lenet5_cuts(channels: int, size: int) -> None:
    model = lenet5(in_channels=channels, image_size=size)
    x = torch.randn(2, channels, size, size)
    bottom, top = split_for_cut("lenet5", model, "s")
    assert cut_shape(bottom, (channels, size, size)) == (6, 14, 14)
    _check_composes(model, bottom, top, x)
    bottom, top = split_for_cut("lenet5", model, "m")
    assert cut_shape(bottom, (channels, size, size)) == (16, 5, 5)
    _check_composes(model, bottom, top, x)
    bottom, _ = split_for_cut("lenet5", model, 1)
    assert [name for name, _ in bottom.named_children()] == ["conv1"]
    with pytest.raises(SplitError, match="'d'"):
        split_for_cut("lenet5", model, "d")


def test_cut_shape_restores_mode_and_stats() -> None:
    bottom, _ = split_model(resnet20(), 3)
    bottom.train()
    _child(bottom, "block0").eval()
    stats = {k: v.clone() for k, v in bottom.state_dict().items()}
    assert cut_shape(bottom, (3, 32, 32)) == (16, 32, 32)
    assert bottom.training
    assert _child(bottom, "stem").training
    assert not _child(bottom, "block0").training
    for key, value in bottom.state_dict().items():
        torch.testing.assert_close(value, stats[key])
    with pytest.raises(SplitError):
        cut_shape(bottom, (3, 0, 32))


def test_cut_shape_of_an_input_the_bottom_cannot_take_is_a_split_error() -> None:
    with pytest.raises(SplitError, match=r"cannot take inputs of shape \[3, 28, 28\]"):
        cut_shape(nn.Conv2d(1, 6, 5), (3, 28, 28))
