"""The codec gives back exactly the tensors it was given, whatever their memory layout."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from splitflower.codec import decode_reply, decode_request, encode_reply, encode_request
from splitflower.errors import CodecError


def _round_trip(tensor: torch.Tensor) -> torch.Tensor:
    sent = decode_request(encode_request(0, "m", {"x": tensor})).tensors["x"]
    back = decode_reply(encode_reply(sent)).value
    assert isinstance(back, torch.Tensor)
    return back


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(3, 4),
        lambda: torch.randn(3, 4).t(),  # non-contiguous
        lambda: torch.arange(10.0)[3:7],  # contiguous with a storage offset
        lambda: torch.arange(12.0).reshape(3, 4)[:, ::2],  # strided
        lambda: torch.tensor(2.5),  # 0-d
        lambda: torch.empty(0, 5),
        lambda: torch.randn(4, requires_grad=True),
        lambda: torch.randn(4)._neg_view(),  # a lazily negated view: numpy() refuses it
        lambda: torch.randn(2, 3).to(torch.bfloat16),  # no numpy dtype
        lambda: torch.tensor([True, False, True]),
    ],
)
def test_every_tensor_layout_round_trips_exactly(make: object) -> None:
    tensor = make()  # type: ignore[operator]
    back = _round_trip(tensor)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and not back.requires_grad
    torch.testing.assert_close(back, tensor.detach().resolve_neg(), rtol=0, atol=0)


def test_a_sparse_tensor_is_refused_even_after_a_dense_one_of_its_dtype_and_shape() -> None:
    dense = torch.eye(3)
    encode_request(0, "m", {"x": dense})  # the dense table is now cached
    with pytest.raises(CodecError, match="expected a dense tensor"):
        encode_request(1, "m", {"x": dense.to_sparse()})


def test_a_meta_tensor_is_refused_even_after_a_real_one_of_its_dtype_and_shape() -> None:
    encode_request(0, "m", {"z": torch.ones(2)})  # the table is now cached
    with pytest.raises(CodecError, match="argument 'z': a meta tensor has a shape but no values to send"):
        encode_request(1, "m", {"z": torch.ones(2, device="meta")})
    with pytest.raises(CodecError, match="returned item '_': a meta tensor"):
        encode_reply(torch.ones(2, device="meta"))


def test_a_non_tensor_is_refused_under_a_name_that_carried_a_tensor() -> None:
    encode_reply({"y": torch.ones(2)})
    with pytest.raises(CodecError, match=r"returned item 'y': expected a torch\.Tensor, got list"):
        encode_reply({"y": [1.0, 1.0]})


def test_a_returned_dict_with_keys_that_are_not_strings_is_refused() -> None:
    with pytest.raises(CodecError, match="str keys"):
        encode_reply({1: torch.ones(1), "1": torch.zeros(1)})  # would collide as "1"


def test_a_value_that_cannot_cross_the_wire_is_named_as_argument_or_returned_item() -> None:
    x = torch.ones(2)
    with pytest.raises(CodecError, match=r"argument 'lr': expected a torch.Tensor, got float; wrap numbers"):
        encode_request(0, "step", {"lr": 0.1})  # type: ignore[dict-item]
    with pytest.raises(CodecError, match=r"returned item '1': expected a torch.Tensor, got NoneType; only tensors"):
        encode_reply((x, None))
    with pytest.raises(CodecError, match=r"returned item 'a': expected a torch.Tensor, got tuple; only tensors"):
        encode_reply({"a": (x, x)})
    with pytest.raises(CodecError, match=r"a returned dict must have str keys, got \[1\] \(int\)"):
        encode_reply({1: x})


def test_a_reply_carries_the_server_s_times_and_frames_a_tensor_in_24_bytes() -> None:
    value = torch.ones(256)  # 1 KiB: the benchmark's smallest size, where framing shows most
    reply = decode_reply(encode_reply(value, server_compute_s=0.0123456, queue_wait_s=3600.5))
    assert reply.server_compute_s == pytest.approx(0.0123456, rel=1e-6)
    assert reply.queue_wait_s == pytest.approx(3600.5, rel=1e-6)
    # head 15 + table 9 (one tensor, its name one byte, one dimension): the data starts 8-aligned
    assert len(encode_reply(value)) - value.nbytes == 24


def _mutated(frame: bytes, rng: random.Random) -> bytes:
    """``frame`` with bytes overwritten, cut off, inserted or deleted at random places."""
    data = bytearray(frame)
    where = rng.randrange(len(data) + 1)
    kind = rng.randrange(4)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[where:]
    elif kind == 2:
        data[where:where] = rng.randbytes(rng.randint(1, 8))
    else:
        del data[where : where + rng.randint(1, 8)]
    return bytes(data)


@pytest.mark.parametrize("decode", [decode_request, decode_reply])
def test_any_damage_to_a_frame_is_a_codec_error_or_decodes(decode: Callable[[bytes], object]) -> None:
    # Corrupt bytes from the network must reach the caller as CodecError (a clear error the
    # service sends back), never as an IndexError, struct.error or numpy error from inside.
    tensors = {"embeddings": torch.randn(4, 3, 2), "labels": torch.arange(4), "mask": torch.ones(2, dtype=torch.bool)}
    frames = (
        [encode_request(3, "forward", tensors), encode_request(0, "f", {})]
        if decode is decode_request
        else [encode_reply(tensors["embeddings"]), encode_reply(tensors), encode_reply(None)]
    )
    rng = random.Random(0)
    for _ in range(4000):
        try:
            decode(_mutated(rng.choice(frames), rng))
        except CodecError:
            pass
