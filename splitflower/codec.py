"""The tensor codec: named tensors as raw bytes with dtype and shape, and nothing else.

No pickle, no protobuf: a frame is a small fixed little-endian header, a table of
``(name, dtype, shape)`` entries and the tensors' raw bytes, each aligned to 8 bytes so
that decoding is a zero-copy :func:`torch.frombuffer`. Every length is checked against
the frame, so corrupt or truncated bytes raise :class:`~splitflower.errors.CodecError`
instead of yielding garbage.

Request frame::

    "SF" | version u8 | kind=1 u8 | flags u8 | token 16B | seq u32 | method (u8 len + utf-8)
    | tensor table | padding to 8 | tensor data (each block padded to 8)

Reply frame::

    "SF" | version u8 | kind=2 u8 | result u8 | server compute s f64 | queue wait s f64
    | tensor table | padding to 8 | tensor data

Tensor table: ``count u8`` then per tensor ``name (u8 len + utf-8) | dtype u8 | ndim u8 |
dims u32 x ndim``. Byte order is little-endian on both ends (every platform splitflower
targets, x86-64 and aarch64, is little-endian).

Example
-------
>>> import torch
>>> frame = encode_request(b"0" * 16, 7, "forward", {"z": torch.ones(2, 3)})
>>> request = decode_request(frame)
>>> request.method, request.seq, tuple(request.tensors["z"].shape)
('forward', 7, (2, 3))
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import torch

from splitflower.errors import CodecError

__all__ = [
    "TOKEN_BYTES",
    "ResultKind",
    "Request",
    "Reply",
    "encode_request",
    "decode_request",
    "encode_reply",
    "decode_reply",
    "payload_bytes",
    "value_tensors",
]

TOKEN_BYTES: Final = 16
_MAGIC: Final = b"SF"
_VERSION: Final = 1
_KIND_REQUEST: Final = 1
_KIND_REPLY: Final = 2
_ALIGN: Final = 8
_REQUEST_HEAD = struct.Struct(f"<2sBBB{TOKEN_BYTES}sI")
_REPLY_HEAD = struct.Struct("<2sBBBdd")
_U8 = struct.Struct("<B")
_ENTRY_HEAD = struct.Struct("<BB")

FLAG_NO_REPLY: Final = 1

_DTYPE_CODES: Final[dict[torch.dtype, int]] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
_CODE_DTYPES: Final = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class ResultKind(IntEnum):
    """How a reply's tensors map back to the method's return value."""

    NONE = 0
    TENSOR = 1
    DICT = 2
    TUPLE = 3


@dataclass(frozen=True)
class Request:
    """A decoded request frame."""

    token: bytes
    seq: int
    method: str
    no_reply: bool
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Reply:
    """A decoded reply frame; ``value`` is what the remote method returned."""

    value: torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...] | None
    server_compute_s: float
    queue_wait_s: float


def payload_bytes(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Bytes of tensor data alone: what the paper's ``numel * itemsize`` accounting counts."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values)


def _pad(length: int) -> int:
    return -length % _ALIGN


def _raw_bytes(name: str, tensor: torch.Tensor) -> memoryview:
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(
            f"argument {name!r}: expected a torch.Tensor, got {type(tensor).__name__}; "
            "wrap numbers with torch.tensor(...)"
        )
    if tensor.layout != torch.strided:
        raise CodecError(f"argument {name!r}: expected a dense tensor, got layout {tensor.layout}")
    if tensor.dtype not in _DTYPE_CODES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
        raise CodecError(f"argument {name!r}: dtype {tensor.dtype} is not supported; use one of {supported}")
    flat = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


def _join(head: bytes, tensors: Mapping[str, torch.Tensor]) -> bytes:
    table_parts: list[bytes] = [_U8.pack(len(tensors))]
    blocks: list[memoryview] = []
    if len(tensors) > 255:
        raise CodecError(f"at most 255 tensors fit in one call, got {len(tensors)}")
    for name, tensor in tensors.items():
        encoded_name = name.encode()
        if not encoded_name or len(encoded_name) > 255:
            raise CodecError(f"tensor names must be 1-255 bytes of UTF-8, got {name!r}")
        data = _raw_bytes(name, tensor)
        if tensor.dim() > 255:
            raise CodecError(f"argument {name!r}: at most 255 dimensions, got {tensor.dim()}")
        table_parts.append(_U8.pack(len(encoded_name)) + encoded_name)
        table_parts.append(_ENTRY_HEAD.pack(_DTYPE_CODES[tensor.dtype], tensor.dim()))
        table_parts.append(struct.pack(f"<{tensor.dim()}I", *tensor.shape))
        blocks.append(data)
    parts: list[bytes | memoryview] = [head, *table_parts]
    offset = len(head) + sum(len(p) for p in table_parts)
    for block in blocks:
        padding = _pad(offset)
        if padding:
            parts.append(bytes(padding))
        parts.append(block)
        offset += padding + len(block)
    return b"".join(parts)


def encode_request(
    token: bytes, seq: int, method: str, tensors: Mapping[str, torch.Tensor], *, no_reply: bool = False
) -> bytes:
    """Encode one call of ``method`` with keyword tensors into a request frame."""
    if len(token) != TOKEN_BYTES:
        raise CodecError(f"a token is {TOKEN_BYTES} bytes, got {len(token)}")
    encoded_method = method.encode()
    if not encoded_method or len(encoded_method) > 255:
        raise CodecError(f"method names must be 1-255 bytes of UTF-8, got {method!r}")
    head = _REQUEST_HEAD.pack(
        _MAGIC, _VERSION, _KIND_REQUEST, FLAG_NO_REPLY if no_reply else 0, token, seq & 0xFFFFFFFF
    )
    return _join(head + _U8.pack(len(encoded_method)) + encoded_method, tensors)


def value_tensors(value: object) -> dict[str, torch.Tensor]:
    """The tensors of a method's return value, named as the reply frame names them."""
    if value is None:
        return {}
    if isinstance(value, torch.Tensor):
        return {"_": value}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, tuple | list):
        return {str(i): v for i, v in enumerate(value)}
    raise CodecError(
        "a server-model method must return None, a tensor, a dict of tensors or a tuple "
        f"of tensors, got {type(value).__name__}"
    )


def encode_reply(value: object, *, server_compute_s: float = 0.0, queue_wait_s: float = 0.0) -> bytes:
    """Encode a server-model method's return value (None, a tensor, a dict or a tuple)."""
    tensors = value_tensors(value)
    if value is None:
        kind = ResultKind.NONE
    elif isinstance(value, torch.Tensor):
        kind = ResultKind.TENSOR
    elif isinstance(value, Mapping):
        kind = ResultKind.DICT
    else:
        kind = ResultKind.TUPLE
    head = _REPLY_HEAD.pack(_MAGIC, _VERSION, _KIND_REPLY, kind, server_compute_s, queue_wait_s)
    return _join(head, tensors)


class _Reader:
    """Bounds-checked cursor over a frame."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.view = memoryview(frame)
        self.offset = 0

    def take(self, length: int, what: str) -> memoryview:
        end = self.offset + length
        if end > len(self.view):
            raise CodecError(
                f"frame truncated: {what} needs bytes {self.offset}..{end}, but the frame is {len(self.view)} bytes"
            )
        chunk = self.view[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def text(self, what: str) -> str:
        (length,) = self.unpack(_U8, f"{what} length")
        try:
            return bytes(self.take(int(length), what)).decode()
        except UnicodeDecodeError as err:
            raise CodecError(f"{what} is not valid UTF-8") from err

    def tensors(self) -> dict[str, torch.Tensor]:
        (count,) = self.unpack(_U8, "tensor count")
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for _ in range(int(count)):
            name = self.text("tensor name")
            code, ndim = self.unpack(_ENTRY_HEAD, f"header of tensor {name!r}")
            dtype = _CODE_DTYPES.get(int(code))
            if dtype is None:
                raise CodecError(f"tensor {name!r}: unknown dtype code {code}")
            shape = struct.unpack(f"<{ndim}I", self.take(4 * int(ndim), f"shape of {name!r}"))
            entries.append((name, dtype, shape))
        decoded: dict[str, torch.Tensor] = {}
        for name, dtype, shape in entries:
            if name in decoded:
                raise CodecError(f"tensor {name!r} appears twice in one frame")
            self.take(_pad(self.offset), "padding")
            numel = math.prod(shape)
            start = self.offset
            self.take(numel * dtype.itemsize, f"data of tensor {name!r} {list(shape)}")
            if numel == 0:
                decoded[name] = torch.empty(shape, dtype=dtype)
            else:
                decoded[name] = torch.frombuffer(self.frame, dtype=dtype, count=numel, offset=start).view(shape)
        if self.offset != len(self.view):
            raise CodecError(f"frame has {len(self.view) - self.offset} trailing bytes after its tensors")
        return decoded

    def check_head(self, magic: object, version: object, kind: object, expected_kind: int) -> None:
        if magic != _MAGIC:
            raise CodecError(f"not a splitflower frame: expected magic {_MAGIC!r}, got {magic!r}")
        if version != _VERSION:
            raise CodecError(f"unsupported frame version {version}; this side speaks {_VERSION}")
        if kind != expected_kind:
            raise CodecError(f"expected frame kind {expected_kind}, got {kind}")


def decode_request(frame: bytes) -> Request:
    """Decode a request frame; tensors share memory with ``frame`` (no copy)."""
    reader = _Reader(frame)
    magic, version, kind, flags, token, seq = reader.unpack(_REQUEST_HEAD, "request header")
    reader.check_head(magic, version, kind, _KIND_REQUEST)
    method = reader.text("method name")
    tensors = reader.tensors()
    return Request(
        token=bytes(token),
        seq=int(seq),
        method=method,
        no_reply=bool(int(flags) & FLAG_NO_REPLY),
        tensors=tensors,
    )


def decode_reply(frame: bytes) -> Reply:
    """Decode a reply frame back into the value the remote method returned."""
    reader = _Reader(frame)
    magic, version, kind, result, compute_s, wait_s = reader.unpack(_REPLY_HEAD, "reply header")
    reader.check_head(magic, version, kind, _KIND_REPLY)
    tensors = reader.tensors()
    try:
        result_kind = ResultKind(int(result))
    except ValueError as err:
        raise CodecError(f"unknown result kind {result}") from err
    value: torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...] | None
    if result_kind is ResultKind.NONE:
        value = None
    elif result_kind is ResultKind.TENSOR:
        value = next(iter(tensors.values()), None)
        if value is None or len(tensors) != 1:
            raise CodecError(f"a single-tensor reply must hold one tensor, got {len(tensors)}")
    elif result_kind is ResultKind.DICT:
        value = tensors
    else:
        value = tuple(tensors.values())
    return Reply(value=value, server_compute_s=float(compute_s), queue_wait_s=float(wait_s))


def _prime_frombuffer_warning() -> None:
    # torch warns once per process that frames are read-only bytes; decoded tensors are
    # never written through by the framework, so consume that one warning silently here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0" * 4, dtype=torch.float32)


_prime_frombuffer_warning()
