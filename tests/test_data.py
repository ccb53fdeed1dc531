"""Tests of splitflower.data: offline loaders, ArrayDataset and partitioning."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from splitflower.data import (
    DATASET_NAMES,
    ArrayDataset,
    PartitionSpec,
    client_partition,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_fashion_mnist,
    parse_partition,
    partition,
    synthetic,
)
from splitflower.errors import DatasetError

_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, *, gz: bool) -> None:
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _make_fashion_dir(directory: Path, *, gz: bool, n_train: int = 6, n_test: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    train_y = np.arange(n_train, dtype=np.uint8) % 10
    test_x = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    test_y = np.arange(n_test, dtype=np.uint8) % 10
    _write(directory / "train-images-idx3-ubyte", _idx_bytes(train_x), gz=gz)
    _write(directory / "train-labels-idx1-ubyte", _idx_bytes(train_y), gz=gz)
    _write(directory / "t10k-images-idx3-ubyte", _idx_bytes(test_x), gz=gz)
    _write(directory / "t10k-labels-idx1-ubyte", _idx_bytes(test_y), gz=gz)
    return train_x, train_y


def _cifar_batch(n: int, label_key: bytes, num_classes: int, seed: int) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"synthetic batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _dump(path: Path, obj: Any) -> None:
    # Protocol 4 keeps numpy arrays as _reconstruct/ndarray/dtype globals like the
    # official files (protocol 2 under Python 3 would add _codecs.encode for bytes).
    path.write_bytes(pickle.dumps(obj, protocol=4))


def _make_cifar10(directory: Path, per_batch: int = 3) -> list[dict[bytes, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    batches: list[dict[bytes, Any]] = []
    for i in range(1, 6):
        batch = _cifar_batch(per_batch, b"labels", 10, seed=i)
        _dump(directory / f"data_batch_{i}", batch)
        batches.append(batch)
    _dump(directory / "test_batch", _cifar_batch(2, b"labels", 10, seed=99))
    return batches


def _make_cifar100(directory: Path) -> dict[bytes, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    train = _cifar_batch(7, b"fine_labels", 100, seed=1)
    train[b"coarse_labels"] = [0] * 7
    _dump(directory / "train", train)
    _dump(directory / "test", _cifar_batch(3, b"fine_labels", 100, seed=2))
    return train


def _py2_style_pickle(data: np.ndarray, labels: list[int], label_key: bytes) -> bytes:
    """Hand-assemble a batch the way Python 2's cPickle wrote the official files.

    Protocol 2 with ``str`` (SHORT_BINSTRING/BINSTRING) payloads and
    ``numpy.core.multiarray._reconstruct``; Python 3 cannot produce this directly.
    """

    def short_str(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value

    def global_ref(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def int32(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    n, width = data.shape
    raw = data.astype(np.uint8).tobytes()
    out = b"\x80\x02}(" + short_str(b"data")
    out += global_ref("numpy.core.multiarray", "_reconstruct")
    out += global_ref("numpy", "ndarray") + int32(0) + b"\x85" + short_str(b"b")
    out += b"\x87R(" + int32(1) + int32(n) + int32(width) + b"\x86"
    out += global_ref("numpy", "dtype") + short_str(b"u1") + b"\x89\x88\x87R"
    out += b"(" + int32(3) + short_str(b"|") + b"NNN" + int32(-1) + int32(-1)
    out += int32(0) + b"tb\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += short_str(label_key) + b"](" + b"".join(int32(v) for v in labels)
    return out + b"eu."


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------------------


def test_array_dataset_basics() -> None:
    ds = ArrayDataset(torch.randn(10, 1, 4, 4), torch.arange(10) % 3, 3, "toy")
    assert len(ds) == 10
    assert ds.input_shape == (1, 4, 4)
    sub = ds.subset([0, 2, 4])
    assert len(sub) == 3
    assert torch.equal(sub.labels, torch.tensor([0, 2, 1]))
    assert torch.equal(sub.images[1], ds.images[2])
    assert "toy" in repr(ds)

    sizes = [len(y) for _, y in ds.batches(4, shuffle=False)]
    assert sizes == [4, 4, 2]
    assert [len(y) for _, y in ds.batches(4, shuffle=False, drop_last=True)] == [4, 4]

    gen_a = torch.Generator().manual_seed(1)
    gen_b = torch.Generator().manual_seed(1)
    run_a = torch.cat([y for _, y in ds.batches(3, shuffle=True, generator=gen_a)])
    run_b = torch.cat([y for _, y in ds.batches(3, shuffle=True, generator=gen_b)])
    assert torch.equal(run_a, run_b)
    assert sorted(run_a.tolist()) == sorted(ds.labels.tolist())


def test_array_dataset_validation() -> None:
    with pytest.raises(DatasetError, match="3 images but 2 labels"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64), 2, "x")
    with pytest.raises(DatasetError, match=r"\[0, 2\)"):
        ArrayDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]), 2, "x")
    with pytest.raises(DatasetError, match=r"\[0, 2\)"):
        ArrayDataset(torch.zeros(2, 1, 2, 2), torch.tensor([-1, 0]), 2, "x")
    ds = ArrayDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 2, "x")
    with pytest.raises(DatasetError, match="indices"):
        ds.subset([5])
    with pytest.raises(DatasetError, match="batch_size"):
        ds.batches(0, shuffle=False)


# --------------------------------------------------------------------------------------
# Fashion-MNIST / IDX
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_small_files(tmp_path: Path, gz: bool) -> None:
    train_x, train_y = _make_fashion_dir(tmp_path / "fm", gz=gz)
    train, test = load_fashion_mnist(tmp_path / "fm")
    assert len(train) == 6 and len(test) == 4
    assert train.input_shape == (1, 28, 28)
    assert train.num_classes == 10
    assert train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert torch.equal(train.labels, torch.from_numpy(train_y.astype(np.int64)))
    expected = (train_x[0].astype(np.float32) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(train.images[0, 0].numpy(), expected, rtol=1e-5)


def test_fashion_mnist_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_fashion_dir(tmp_path / "env", gz=True, n_train=3)
    monkeypatch.setenv("SPLITFLOWER_FASHION_MNIST", str(tmp_path / "env"))
    train, _ = load_fashion_mnist()
    assert len(train) == 3


def test_fashion_mnist_bad_magic(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 0x03  # labels file now claims to be a 3-D image file
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"magic number 0x00000803.*0x00000801") as e:
        load_fashion_mnist(tmp_path)
    assert "train-labels-idx1-ubyte" in str(e.value)


def test_fashion_mnist_truncated(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetError, match="truncated") as e:
        load_fashion_mnist(tmp_path)
    message = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in message
    assert str(4 * 28 * 28) in message


def test_fashion_mnist_corrupt_gzip(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="gzip"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path, gz=False)
    labels = np.zeros(5, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    with pytest.raises(DatasetError, match=r"6 images.*5 labels"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_missing_file(tmp_path: Path) -> None:
    _make_fashion_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as e:
        load_fashion_mnist(tmp_path)
    message = str(e.value)
    assert "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "SPLITFLOWER_FASHION_MNIST" in message


def test_fashion_mnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as e:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(e.value)


@pytest.mark.skipif(
    not _FASHION_DIR.is_dir(),
    reason=f"{_FASHION_DIR} not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_system_copy() -> None:
    train, test = load_fashion_mnist(_FASHION_DIR)
    assert len(train) == 60000 and len(test) == 10000
    assert train.input_shape == (1, 28, 28) == test.input_shape
    assert train.num_classes == 10
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert abs(float(train.images.mean())) < 0.05
    assert abs(float(train.images.std()) - 1.0) < 0.05
    # A second load comes from the per-process cache.
    again, _ = load_fashion_mnist(_FASHION_DIR)
    assert again.images is train.images


# --------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["direct", "parent"])
def test_cifar10_layouts(tmp_path: Path, layout: str) -> None:
    batches = _make_cifar10(tmp_path / "cifar-10-batches-py")
    root = tmp_path / "cifar-10-batches-py" if layout == "direct" else tmp_path
    train, test = load_cifar10(root)
    assert len(train) == 15 and len(test) == 2
    assert train.input_shape == (3, 32, 32)
    assert train.num_classes == 10
    assert train.name == "cifar10"
    assert train.labels.tolist()[:3] == batches[0][b"labels"]
    first = batches[0][b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255.0
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(train.images[0].numpy(), (first - mean) / std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["direct", "parent"])
def test_cifar100_layouts(tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    train_batch = _make_cifar100(tmp_path / "cifar-100-python")
    root = tmp_path / "cifar-100-python" if layout == "direct" else tmp_path
    monkeypatch.setenv("SPLITFLOWER_CIFAR100", str(root))
    train, test = load_dataset("cifar100")
    assert len(train) == 7 and len(test) == 3
    assert train.num_classes == 100
    assert train.labels.tolist() == train_batch[b"fine_labels"]
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    raw = torch.from_numpy(train_batch[b"data"][1].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(train.images[1], (raw - mean) / std)


def test_cifar10_python2_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4"]:
        (tmp_path / name).write_bytes(_py2_style_pickle(data, [1, 2], b"labels"))
    (tmp_path / "data_batch_5").write_bytes(_py2_style_pickle(data, [3, 9], b"labels"))
    (tmp_path / "test_batch").write_bytes(_py2_style_pickle(data, [0, 5], b"labels"))
    train, test = load_cifar10(tmp_path)
    assert len(train) == 10
    assert train.labels.tolist() == [1, 2] * 4 + [3, 9]
    assert test.labels.tolist() == [0, 5]
    raw = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(test.images[1], (raw - mean) / std)


def test_cifar_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as e:
        load_cifar10(tmp_path)
    message = str(e.value)
    assert "data_batch_3" in message and "cannot be downloaded" in message
    monkeypatch.delenv("SPLITFLOWER_CIFAR10", raising=False)
    with pytest.raises(DatasetError, match="cannot be downloaded"):
        load_cifar10()


def test_cifar_forbidden_global_not_executed(tmp_path: Path) -> None:
    _make_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    evil = _cifar_batch(3, b"fine_labels", 100, seed=5)
    evil[b"payload"] = _Evil(marker)
    _dump(tmp_path / "test", evil)
    with pytest.raises(DatasetError, match=r"refusing to unpickle global '\w+\.system'"):
        load_cifar100(tmp_path)
    assert not marker.exists()


def test_cifar_malformed_batch(tmp_path: Path) -> None:
    _make_cifar100(tmp_path)
    bad = _cifar_batch(3, b"fine_labels", 100, seed=5)
    bad[b"data"] = bad[b"data"][:, :100]
    _dump(tmp_path / "test", bad)
    with pytest.raises(DatasetError, match="3072"):
        load_cifar100(tmp_path)
    (tmp_path / "test").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="not a valid CIFAR batch"):
        load_cifar100(tmp_path)


@pytest.mark.parametrize(
    ("labels", "found"),
    [
        ([0.7] * 3, "got a list holding float 0.7"),
        (np.zeros((3, 2), np.int64), r"got a numpy array of dtype int64 and shape \(3, 2\)"),
        (np.full(3, np.nan), r"got a numpy array of dtype float64 and shape \(3,\)"),
        ([True, False, True], "got a list holding bool True"),
    ],
    ids=["float", "2-D", "NaN", "bool"],
)
def test_cifar_labels_must_be_one_integer_per_image(tmp_path: Path, labels: Any, found: str) -> None:
    _make_cifar100(tmp_path)
    bad = _cifar_batch(3, b"fine_labels", 100, seed=5)
    bad[b"fine_labels"] = labels
    _dump(tmp_path / "test", bad)
    with pytest.raises(
        DatasetError, match=f"'fine_labels' must be a list of ints or a 1-D integer numpy array.*{found}"
    ):
        load_cifar100(tmp_path)


def test_cifar_labels_pickled_as_numpy_integer_scalars_load_and_no_other_scalar_does(tmp_path: Path) -> None:
    _make_cifar100(tmp_path)
    batch = _cifar_batch(3, b"fine_labels", 100, seed=5)
    batch[b"fine_labels"] = [np.int64(7), np.uint8(99), np.int32(0)]  # as list(rng.integers(...)) gives
    _dump(tmp_path / "test", batch)
    _, test = load_cifar100(tmp_path)
    assert test.labels.tolist() == [7, 99, 0] and test.labels.dtype == torch.int64
    batch[b"fine_labels"] = [np.float64(7.0)] * 3
    _dump(tmp_path / "test", batch)
    with pytest.raises(DatasetError, match=r"numpy scalar of dtype dtype\('float64'\).*only hold numpy integer"):
        load_cifar100(tmp_path)
    # An object scalar would hand back whatever its payload unpickled to.
    _dump(tmp_path / "test", [np.int64(7)])
    evil = (tmp_path / "test").read_bytes().replace(b"i8", b"O8")
    (tmp_path / "test").write_bytes(evil)
    with pytest.raises(DatasetError, match=r"numpy scalar of dtype dtype\('O'\)"):
        load_cifar100(tmp_path)


@pytest.mark.parametrize(
    ("data", "found"),
    [(np.zeros((3, 3072), np.float32), "got float32 ndarray"), ([[0] * 3072] * 3, "got list")],
    ids=["float32", "list"],
)
def test_cifar_data_of_the_wrong_kind_is_named(tmp_path: Path, data: Any, found: str) -> None:
    _make_cifar100(tmp_path)
    bad = _cifar_batch(3, b"fine_labels", 100, seed=5)
    bad[b"data"] = data
    _dump(tmp_path / "test", bad)
    with pytest.raises(DatasetError, match=f"'data' must be a uint8 numpy array, {found}$"):
        load_cifar100(tmp_path)


# --------------------------------------------------------------------------------------
# synthetic / dispatch
# --------------------------------------------------------------------------------------


def test_synthetic_deterministic() -> None:
    a_train, a_test = synthetic(seed=7)
    b_train, b_test = synthetic(seed=7)
    c_train, _ = synthetic(seed=8)
    assert torch.equal(a_train.images, b_train.images)
    assert torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert len(a_train) == 512 and len(a_test) == 256
    assert a_train.input_shape == (1, 28, 28)
    small, _ = synthetic(20, 5, num_classes=3, input_shape=(3, 4, 4))
    assert small.input_shape == (3, 4, 4) and small.num_classes == 3
    with pytest.raises(DatasetError):
        synthetic(input_shape=(1, 0, 4))


def test_synthetic_learnable() -> None:
    torch.manual_seed(0)
    train, test = synthetic(seed=0)
    model = torch.nn.Linear(28 * 28, 10)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    x = train.images.flatten(1)
    for _ in range(40):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), train.labels)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        train_acc = (model(x).argmax(1) == train.labels).float().mean().item()
        test_acc = ((model(test.images.flatten(1)).argmax(1) == test.labels).float().mean()).item()
    assert train_acc > 0.8
    assert test_acc > 0.5


def test_load_dataset_dispatch() -> None:
    assert DATASET_NAMES == ("fashion-mnist", "cifar10", "cifar100", "synthetic")
    train, _ = load_dataset("synthetic", seed=1)
    assert torch.equal(train.images, synthetic(seed=1)[0].images)
    with pytest.raises(DatasetError, match="fashion-mnist, cifar10, cifar100"):
        load_dataset("mnist")


# --------------------------------------------------------------------------------------
# partitioning
# --------------------------------------------------------------------------------------


def _labelled(n: int, num_classes: int = 10) -> ArrayDataset:
    labels = torch.arange(n) % num_classes
    # Image i carries its own index so partitions can be traced back to samples.
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return ArrayDataset(images, labels, num_classes, "traced")


def _covered(parts: list[ArrayDataset]) -> list[int]:
    return sorted(int(v) for p in parts for v in p.images.flatten().tolist())


def test_parse_partition() -> None:
    assert parse_partition("iid") == PartitionSpec("iid", None)
    assert parse_partition(" IID ") == PartitionSpec("iid")
    assert parse_partition("dirichlet:0.5") == PartitionSpec("dirichlet", 0.5)
    assert str(parse_partition("dirichlet:2")) == "dirichlet:2.0"
    for bad in ["", "dirichlet", "dirichlet:", "dirichlet:x", "dirichlet:0"]:
        with pytest.raises(DatasetError, match="dirichlet:ALPHA") as e:
            parse_partition(bad)
        assert repr(bad) in str(e.value)
    for bad in ["dirichlet:-1", "dirichlet:nan", "dirichlet:inf", "shards:2"]:
        with pytest.raises(DatasetError, match="iid"):
            parse_partition(bad)
    with pytest.raises(DatasetError):
        PartitionSpec("dirichlet", None)
    with pytest.raises(DatasetError):
        PartitionSpec("iid", 1.0)


def test_iid_partition_covers_once() -> None:
    ds = _labelled(103)
    parts = partition(ds, 5, "iid", seed=3)
    assert len(parts) == 5
    assert _covered(parts) == list(range(103))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # Shuffled before sharding: a shard is not a contiguous run of samples.
    first = parts[0].images.flatten().tolist()
    assert first != sorted(first) or first[-1] - first[0] != len(first) - 1


def test_dirichlet_partition_skewed_and_complete() -> None:
    ds = _labelled(2000)
    parts = partition(ds, 10, "dirichlet:0.1", seed=0)
    assert _covered(parts) == list(range(2000))
    assert all(len(p) >= 1 for p in parts)
    max_share = max(float(torch.bincount(p.labels, minlength=10).max()) / len(p) for p in parts)
    # Uniform label mix would be 0.1 per class; strong skew puts most on one class.
    assert max_share > 0.5


def test_partition_reproducible() -> None:
    ds = _labelled(500)
    for spec in ("iid", "dirichlet:0.3"):
        a = partition(ds, 4, spec, seed=11)
        b = partition(_labelled(500), 4, parse_partition(spec), seed=11)
        assert [p.images.flatten().tolist() for p in a] == [p.images.flatten().tolist() for p in b]
        c = partition(ds, 4, spec, seed=12)
        assert [p.images.flatten().tolist() for p in a] != [p.images.flatten().tolist() for p in c]
        one = client_partition(ds, 2, 4, spec, seed=11)
        assert torch.equal(one.images, a[2].images)


def test_partition_validation() -> None:
    ds = _labelled(10)
    with pytest.raises(DatasetError, match="num_partitions"):
        partition(ds, 0, "iid")
    with pytest.raises(DatasetError, match="num_partitions"):
        partition(ds, 11, "iid")
    with pytest.raises(DatasetError, match="dirichlet:ALPHA"):
        partition(ds, 2, "dirichlet:-3")
    with pytest.raises(DatasetError, match=r"partition_id.*\[0, 4\)"):
        client_partition(ds, 4, 4, "iid")
    with pytest.raises(DatasetError, match="partition_id"):
        client_partition(ds, -1, 4, "iid")
    # Every sample on its own client still works for tiny data.
    singles = partition(ds, 10, "iid")
    assert [len(p) for p in singles] == [1] * 10
