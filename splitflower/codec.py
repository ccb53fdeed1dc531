"""The tensor codec: named tensors as raw bytes with dtype and shape, and nothing else.

No pickle, no protobuf: a frame is a small fixed little-endian header, a table of
``(name, dtype, shape)`` entries and the tensors' raw bytes, each aligned to 8 bytes so
that decoding is a zero-copy :func:`torch.frombuffer`. Every length is checked against
the frame, so corrupt or truncated bytes raise :class:`~splitflower.errors.CodecError`
instead of yielding garbage.

Request frame::

    "SF" | version u8 | kind=1 u8 | flags u8 | seq u32 | settled below u32 | table length u16
    | method (u8 len + utf-8) | tensor table | padding to 8 | tensor data (each block padded to 8)

Reply frame::

    "SF" | version u8 | kind=2 u8 | result u8 | server compute s f32 | queue wait s f32
    | table length u16 | tensor table | padding to 8 | tensor data (each block padded to 8)

Tensor table: ``count u8`` then per tensor ``name (u8 len + utf-8) | dtype u8 | ndim u8 |
dims u32 x ndim``. Byte order is little-endian on both ends (every platform splitflower
targets, x86-64 and aarch64, is little-endian). A request carries no credential: the
client's token is in the gRPC method path it calls (:func:`splitflower.wire.call_path`).

Example
-------
>>> import torch
>>> frame = encode_request(7, "forward", {"z": torch.ones(2, 3)})
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
from typing import Any, Final, NamedTuple

import torch

from splitflower.errors import CodecError

__all__ = [
    "ResultKind",
    "Request",
    "Reply",
    "encode_request",
    "decode_request",
    "check_value",
    "MAX_DIMENSIONS",
    "encode_reply",
    "decode_reply",
    "payload_bytes",
    "value_tensors",
]

_MAGIC: Final = b"SF"
# 3: a reply's two times are f32 (a reply of one tensor fits 24 bytes of head and table);
# 4: the token left the request frame for the gRPC method path.
_VERSION: Final = 4
_KIND_REQUEST: Final = 1
_KIND_REPLY: Final = 2
_ALIGN: Final = 8
_REQUEST_HEAD = struct.Struct("<2sBBBIIH")
_REPLY_HEAD = struct.Struct("<2sBBBffH")
_U8 = struct.Struct("<B")
_ENTRY_HEAD = struct.Struct("<BB")

_FLAG_NO_REPLY: Final = 1

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


class Request(NamedTuple):
    """A decoded request frame."""

    seq: int
    method: str
    no_reply: bool
    tensors: dict[str, torch.Tensor]
    settled_below: int = 0
    """Every request numbered below this has settled on the client (answered, or failed
    there): one of them the server has not seen will never come."""


class Reply(NamedTuple):
    """A decoded reply frame; ``value`` is what the remote method returned."""

    value: torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...] | None
    server_compute_s: float
    queue_wait_s: float


def payload_bytes(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Bytes of tensor data alone: what the paper's ``numel * itemsize`` accounting counts."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.nbytes for t in values)


def _pad(length: int) -> int:
    return -length % _ALIGN


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    nbytes: int


# Tables repeat batch after batch (same names, dtypes, shapes): encode and parse each once.
_ENCODED_TABLES: dict[tuple[Any, ...], bytes] = {}
_PARSED_TABLES: dict[bytes, tuple[_Entry, ...]] = {}
_CACHE_LIMIT = 1024
# Only tables of frames that decoded whole, and small ones (a real call's table is tens of
# bytes per tensor), are cached: junk must not fill the cache.
_CACHED_TABLE_BYTES = 1024
MAX_DIMENSIONS: Final = 64
"""Most dimensions a tensor on the wire may have (torch's own limit)."""
_MAX_ELEMENTS = 2**62


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _check_tensor(name: str, tensor: object, role: str = "argument") -> torch.Tensor:
    """``role`` names what ``name`` is in messages: an argument, or an item of a return value."""
    if not isinstance(tensor, torch.Tensor):
        hint = (
            "wrap numbers with torch.tensor(...)"
            if isinstance(tensor, int | float | complex)
            else "only tensors cross the wire (no None, nested containers or other objects)"
        )
        raise CodecError(f"{role} {name!r}: expected a torch.Tensor, got {type(tensor).__name__}; {hint}")
    if tensor.is_meta:
        raise CodecError(f"{role} {name!r}: a meta tensor has a shape but no values to send; compute it on a device")
    if tensor.layout != torch.strided:
        raise CodecError(f"{role} {name!r}: expected a dense tensor, got layout {tensor.layout}")
    if tensor.dtype not in _DTYPE_CODES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
        raise CodecError(f"{role} {name!r}: dtype {tensor.dtype} is not supported; use one of {supported}")
    if tensor.dim() > MAX_DIMENSIONS:
        raise CodecError(f"{role} {name!r}: at most {MAX_DIMENSIONS} dimensions, got {tensor.dim()}")
    return tensor


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    if not tensor.requires_grad and tensor.is_cpu:
        # The common case in one torch call: numpy() fails for bfloat16 and neg/conj views,
        # cast() for non-contiguous and empty arrays; those take the general path below.
        try:
            return tensor.numpy().data.cast("B")
        except (TypeError, RuntimeError):
            pass
    if tensor.requires_grad:
        tensor = tensor.detach()
    tensor = tensor.resolve_neg()  # a lazily negated view's bytes are not its values
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.dtype is torch.bfloat16:  # numpy has no bfloat16; the bytes are what matter
        tensor = tensor.view(torch.int16)
    if tensor.dim() != 1:  # memoryview casts only flat, non-empty views
        tensor = tensor.reshape(-1)
    if tensor.numel() == 0:
        return memoryview(b"")
    return tensor.numpy().data.cast("B")


def _encode_table(tensors: Mapping[str, torch.Tensor], role: str = "argument") -> bytes:
    """The tensor table, after checking every tensor (see :func:`_check_tensor`): a table
    seen before stands for tensors of the same names, dtypes, layouts, shapes and kinds of
    device (meta or not), all checked."""
    try:
        key: tuple[Any, ...] | None = tuple(
            (name, t.dtype, t.layout, t.shape, t.is_meta) for name, t in tensors.items()
        )
    except AttributeError:  # not a tensor: _check_tensor below says so
        key = None
    table = None if key is None else _ENCODED_TABLES.get(key)
    if table is not None:
        return table
    if len(tensors) > 255:
        raise CodecError(f"at most 255 tensors fit in one call, got {len(tensors)}")
    parts = [_U8.pack(len(tensors))]
    for name, tensor in tensors.items():
        encoded_name = name.encode()
        if not encoded_name or len(encoded_name) > 255:
            raise CodecError(f"tensor names must be 1-255 bytes of UTF-8, got {name!r}")
        _check_tensor(name, tensor, role)
        parts.append(_U8.pack(len(encoded_name)) + encoded_name)
        parts.append(_ENTRY_HEAD.pack(_DTYPE_CODES[tensor.dtype], tensor.dim()))
        parts.append(struct.pack(f"<{tensor.dim()}I", *tensor.shape))
    table = b"".join(parts)
    if len(table) > 0xFFFF:
        raise CodecError(f"the tensor table is {len(table)} bytes; at most 65535 fit in a frame")
    if key is not None:
        _remember(_ENCODED_TABLES, key, table)
    return table


def _join(head: bytes, table: bytes, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The frame: ``table`` must come from :func:`_encode_table` of these ``tensors``."""
    parts: list[bytes | memoryview] = [head, table]
    padding = _pad(len(head) + len(table))
    if padding:
        parts.append(_ZEROS[:padding])
    for tensor in tensors.values():
        block = _raw_bytes(tensor)
        parts.append(block)
        padding = _pad(len(block))
        if padding:
            parts.append(_ZEROS[:padding])
    return b"".join(parts)


_ZEROS = bytes(_ALIGN)


def encode_request(
    seq: int,
    method: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    no_reply: bool = False,
    settled_below: int | None = None,
) -> bytes:
    """Encode one call of ``method`` with keyword tensors into a request frame.

    ``settled_below`` (default ``seq``): the client's lowest request number still awaiting
    its outcome, so the server can tell a request that failed before reaching it from one
    still on its way.
    """
    encoded_method = method.encode()
    if not encoded_method or len(encoded_method) > 255:
        raise CodecError(f"method names must be 1-255 bytes of UTF-8, got {method!r}")
    table = _encode_table(tensors)
    head = _REQUEST_HEAD.pack(
        _MAGIC,
        _VERSION,
        _KIND_REQUEST,
        _FLAG_NO_REPLY if no_reply else 0,
        seq & 0xFFFFFFFF,
        (seq if settled_below is None else settled_below) & 0xFFFFFFFF,
        len(table),
    )
    return _join(head + _U8.pack(len(encoded_method)) + encoded_method, table, tensors)


_RETURNED = "returned item"  # "_" for a single tensor, the key or position otherwise


def value_tensors(value: object) -> dict[str, torch.Tensor]:
    """The tensors of a method's return value, named as the reply frame names them."""
    if value is None:
        return {}
    if isinstance(value, torch.Tensor):
        return {"_": value}
    if isinstance(value, Mapping):
        others = [k for k in value if not isinstance(k, str)]
        if others:
            raise CodecError(f"a returned dict must have str keys, got {others!r} ({type(others[0]).__name__})")
        return dict(value)
    if isinstance(value, tuple | list):
        return {str(i): v for i, v in enumerate(value)}
    raise CodecError(
        "a server-model method must return None, a tensor, a dict of tensors or a tuple "
        f"of tensors, got {type(value).__name__}"
    )


def check_value(value: object) -> None:
    """Raise :class:`CodecError` if :func:`encode_reply` could not carry ``value`` (nothing
    is encoded: for a fire-and-forget call, whose reply carries no value)."""
    for name, tensor in value_tensors(value).items():
        _check_tensor(name, tensor, _RETURNED)


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
    table = _encode_table(tensors, _RETURNED)
    head = _REPLY_HEAD.pack(_MAGIC, _VERSION, _KIND_REPLY, kind, server_compute_s, queue_wait_s, len(table))
    return _join(head, table, tensors)


def _parse_table(table: bytes) -> tuple[_Entry, ...]:
    view, offset = memoryview(table), 0

    def take(length: int, what: str) -> memoryview:
        nonlocal offset
        if offset + length > len(view):
            raise CodecError(f"tensor table truncated: {what} needs {length} bytes at {offset} of {len(view)}")
        chunk = view[offset : offset + length]
        offset += length
        return chunk

    (count,) = _U8.unpack(take(1, "tensor count"))
    parsed: list[_Entry] = []
    for _ in range(count):
        (name_length,) = _U8.unpack(take(1, "name length"))
        try:
            name = bytes(take(name_length, "tensor name")).decode()
        except UnicodeDecodeError as err:
            raise CodecError("a tensor name is not valid UTF-8") from err
        code, ndim = _ENTRY_HEAD.unpack(take(_ENTRY_HEAD.size, f"header of tensor {name!r}"))
        dtype = _CODE_DTYPES.get(code)
        if dtype is None:
            raise CodecError(f"tensor {name!r}: unknown dtype code {code}")
        if ndim > MAX_DIMENSIONS:
            raise CodecError(f"tensor {name!r}: {ndim} dimensions, at most {MAX_DIMENSIONS} are allowed")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim, f"shape of {name!r}"))
        numel = math.prod(shape)
        if math.prod(max(size, 1) for size in shape) > _MAX_ELEMENTS:  # even when numel is 0: strides overflow
            raise CodecError(f"tensor {name!r}: shape {list(shape)} is too large to index")
        parsed.append(_Entry(name, dtype, shape, numel, numel * dtype.itemsize))
    if offset != len(view):
        raise CodecError(f"tensor table has {len(view) - offset} unexplained trailing bytes")
    if len({e.name for e in parsed}) != len(parsed):
        raise CodecError("a tensor name appears twice in one frame")
    return tuple(parsed)


def _decode_tensors(frame: bytes, offset: int, table_length: int) -> dict[str, torch.Tensor]:
    if offset + table_length > len(frame):
        raise CodecError(f"frame truncated: the tensor table needs {table_length} bytes at {offset} of {len(frame)}")
    table = frame[offset : offset + table_length]
    cached = _PARSED_TABLES.get(table)
    entries = cached if cached is not None else _parse_table(table)
    offset += table_length
    offset += _pad(offset)
    expected = offset + sum(e.nbytes + _pad(e.nbytes) for e in entries)
    if expected != len(frame):
        shapes = ", ".join(f"{e.name} {list(e.shape)} {str(e.dtype).removeprefix('torch.')}" for e in entries[:4])
        more = f" and {len(entries) - 4} more" if len(entries) > 4 else ""
        raise CodecError(f"frame is {len(frame)} bytes but its table ({shapes or 'no tensors'}{more}) needs {expected}")
    if cached is None and table_length <= _CACHED_TABLE_BYTES:
        _remember(_PARSED_TABLES, table, entries)
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.numel == 0:
            tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            flat = torch.frombuffer(frame, dtype=entry.dtype, count=entry.numel, offset=offset)
            tensors[entry.name] = flat if len(entry.shape) == 1 else flat.view(entry.shape)
        offset += entry.nbytes + _pad(entry.nbytes)
    return tensors


def _check_head(magic: bytes, version: int, kind: int, expected_kind: int) -> None:
    if magic != _MAGIC:
        raise CodecError(f"not a splitflower frame: expected magic {_MAGIC!r}, got {magic!r}")
    if version != _VERSION:
        raise CodecError(
            f"unsupported frame version {version}; this side speaks {_VERSION}: "
            "run the same splitflower version on the server and every client"
        )
    if kind != expected_kind:
        raise CodecError(f"expected frame kind {expected_kind}, got {kind}")


def _request_head(frame: bytes) -> tuple[Any, ...]:
    if len(frame) < _REQUEST_HEAD.size + 1:
        raise CodecError(f"frame truncated: {len(frame)} bytes is shorter than a request header")
    head = _REQUEST_HEAD.unpack_from(frame)
    _check_head(head[0], head[1], head[2], _KIND_REQUEST)
    return head


def decode_request(frame: bytes) -> Request:
    """Decode a request frame; tensors share memory with ``frame`` (no copy)."""
    _, _, _, flags, seq, settled_below, table_length = _request_head(frame)
    offset = _REQUEST_HEAD.size
    method_length = frame[offset]
    method_bytes = frame[offset + 1 : offset + 1 + method_length]
    if len(method_bytes) != method_length:
        raise CodecError("frame truncated inside the method name")
    try:
        method = method_bytes.decode()
    except UnicodeDecodeError as err:
        raise CodecError("the method name is not valid UTF-8") from err
    tensors = _decode_tensors(frame, offset + 1 + method_length, table_length)
    no_reply = bool(flags & _FLAG_NO_REPLY)
    return Request(seq, method, no_reply, tensors, settled_below)


def decode_reply(frame: bytes) -> Reply:
    """Decode a reply frame back into the value the remote method returned."""
    if len(frame) < _REPLY_HEAD.size:
        raise CodecError(f"frame truncated: {len(frame)} bytes is shorter than a reply header")
    magic, version, kind, result, compute_s, wait_s, table_length = _REPLY_HEAD.unpack_from(frame)
    _check_head(magic, version, kind, _KIND_REPLY)
    tensors = _decode_tensors(frame, _REPLY_HEAD.size, table_length)
    try:
        result_kind = ResultKind(result)
    except ValueError as err:
        raise CodecError(f"unknown result kind {result}") from err
    value: torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...] | None
    if result_kind is ResultKind.NONE:
        value = None
    elif result_kind is ResultKind.TENSOR:
        if len(tensors) != 1:
            raise CodecError(f"a single-tensor reply must hold one tensor, got {len(tensors)}")
        value = next(iter(tensors.values()))
    elif result_kind is ResultKind.DICT:
        value = tensors
    else:
        value = tuple(tensors.values())
    return Reply(value=value, server_compute_s=compute_s, queue_wait_s=wait_s)


def _prime_frombuffer_warning() -> None:
    # torch warns once per process that frames are read-only bytes; decoded tensors are
    # never written through by the framework, so consume that one warning silently here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0" * 4, dtype=torch.float32)


_prime_frombuffer_warning()
