"""Decoding one tensor of a tensor set, within the declared limits and no more.

A tensor's header entry is checked against :class:`~fedmq.wire.limits.DecodeLimits`
(:func:`parse_entry`) before anything is allocated; :func:`decode_footprint` says
how much a decode will allocate, so a tensor set can refuse a declared total before
decompressing.  Decoders take their bytes from a :class:`SegmentSource` a step of at
most ``STREAM_CHUNK`` bytes at a time, so scratch memory stays bounded too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedmq.errors import (
    LimitExceededError,
    MalformedMessageError,
    UnsupportedCodecError,
    UnsupportedDtypeError,
)
from fedmq.wire.framing import require, require_int
from fedmq.wire.limits import DecodeLimits
from fedmq.wire.tensor_codecs import (
    CODEC_NAMES,
    FLOAT32,
    FLOAT_DTYPES,
    HALF,
    HALF_BITS,
    MAX_INT8_BLOCK,
    CodecName,
    little_endian,
)

STREAM_CHUNK = 256 * 1024  # bytes of scratch per decoding step (bounded, cache-sized)


def _check_entry(
    entry: Any, limits: DecodeLimits
) -> tuple[str, np.dtype[Any], tuple[int, ...], int]:
    if not isinstance(entry, dict):
        raise MalformedMessageError(f"tensor entry must be a map, got {type(entry).__name__}")
    name = require(entry, "name", str)
    if len(name) > limits.max_name_length:
        raise LimitExceededError("tensor name length", len(name), limits.max_name_length)
    dtype_name = require(entry, "dtype", str)
    if dtype_name not in limits.allowed_dtypes:
        raise UnsupportedDtypeError(
            f"tensor {name!r} has dtype {dtype_name!r}, not among the allowed "
            f"{sorted(limits.allowed_dtypes)}"
        )
    dtype = little_endian(np.dtype(dtype_name))
    shape_list = require(entry, "shape", list)
    if len(shape_list) > limits.max_rank:
        raise LimitExceededError(f"rank of tensor {name!r}", len(shape_list), limits.max_rank)
    shape: list[int] = []
    count = 1
    for dim in shape_list:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise MalformedMessageError(f"tensor {name!r} has an invalid dimension {dim!r}")
        shape.append(dim)
        count *= dim  # Python ints: no overflow however large the declared dims
    if count > limits.max_elements_per_tensor:
        raise LimitExceededError(
            f"element count of tensor {name!r}", count, limits.max_elements_per_tensor
        )
    return name, dtype, tuple(shape), count


@dataclass(frozen=True)
class TensorLayout:
    """A validated header entry: everything needed to decode one tensor's segment."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    count: int
    codec: CodecName
    length: int
    shuffle: bool = False
    block: int = 0
    k: int = 0

    @property
    def decoded_bytes(self) -> int:
        """Bytes the decoded array occupies."""
        return self.count * self.dtype.itemsize


def parse_entry(entry: Any, limits: DecodeLimits) -> TensorLayout:
    """Validate one tensor header entry against ``limits`` without touching any payload.

    Raises:
        MalformedMessageError, UnsupportedDtypeError, UnsupportedCodecError, LimitExceededError.
    """
    name, dtype, shape, count = _check_entry(entry, limits)
    codec = require(entry, "codec", str)
    if codec not in CODEC_NAMES:
        raise UnsupportedCodecError(f"tensor {name!r} uses unknown codec {codec!r}")
    if codec != "raw" and dtype.name not in FLOAT_DTYPES:
        raise MalformedMessageError(f"codec {codec!r} applied to {dtype.name} tensor {name!r}")
    length = require_int(entry, "len", 0, 2**63)
    layout = TensorLayout(name, dtype, shape, count, codec, length)
    if codec in ("raw", "fp16"):
        shuffle = require(entry, "shuffle", bool)
        itemsize = dtype.itemsize if codec == "raw" else 2
        expected = count * itemsize
        layout = TensorLayout(name, dtype, shape, count, codec, length, shuffle=shuffle)
    elif codec == "int8":
        block = require_int(entry, "block", 1, MAX_INT8_BLOCK + 1)
        expected = math.ceil(count / block) * 4 + count
        layout = TensorLayout(name, dtype, shape, count, codec, length, block=block)
    else:
        k = require_int(entry, "k", 0, count + 1)
        if count and not k:
            raise MalformedMessageError(f"topk tensor {name!r} keeps no element")
        expected = k * (4 + dtype.itemsize)
        layout = TensorLayout(name, dtype, shape, count, codec, length, k=k)
    if length != expected:
        raise MalformedMessageError(
            f"tensor {name!r} ({codec}, shape {list(shape)}) declares {length} bytes, "
            f"its layout needs {expected}"
        )
    return layout


class SegmentSource(Protocol):
    """The decompressed tensor body, read front to back one segment at a time.

    ``streamed`` sources (zstd) decompress into the buffer the decoder passes as
    ``into``; unstreamed ones (an uncompressed body) return views of the body and
    ignore ``into`` (the decoder passes None).
    """

    streamed: bool

    def take(self, size: int, into: npt.NDArray[np.uint8] | None) -> memoryview:
        """The next ``size`` bytes: a view of the body, or ``into[:size]`` filled."""
        ...


def _chunk_elements(count: int, bytes_per_element: int) -> int:
    """Elements decoded per step so one step's scratch stays within ``STREAM_CHUNK``."""
    return max(1, min(count, STREAM_CHUNK // bytes_per_element))


def _shuffled_raw(layout: TensorLayout) -> bool:
    return layout.shuffle and layout.dtype.itemsize > 1


def decodes_as_view(layout: TensorLayout) -> bool:
    """Whether the tensor decodes to a view of its segment (``raw``, not shuffled)."""
    return layout.codec == "raw" and not _shuffled_raw(layout)


def decode_footprint(layout: TensorLayout, *, streamed: bool) -> tuple[int, int]:
    """What decoding ``layout`` allocates: ``(array bytes kept, scratch bytes while decoding)``.

    The same arithmetic as the decoders below, so a tensor set's peak allocation is known
    (and checked against :class:`DecodeLimits`) before anything is allocated: the kept
    arrays of every tensor plus the largest single tensor's scratch.  Unstreamed raw
    tensors are views of the body and keep nothing.
    """
    count, itemsize = layout.count, layout.dtype.itemsize
    if layout.codec == "raw":
        if not _shuffled_raw(layout):
            return (layout.decoded_bytes if streamed else 0), 0
        return layout.decoded_bytes, (_chunk_elements(count, 1) if streamed else 0)
    if layout.codec == "fp16":
        if not layout.shuffle:
            return layout.decoded_bytes, (2 * _chunk_elements(count, 2) if streamed else 0)
        per = 4 if streamed else 2  # (low copy, high bytes,) 16-bit values
        return layout.decoded_bytes, per * _chunk_elements(count, per)
    if layout.codec == "int8":
        scales = 4 * math.ceil(count / layout.block) if streamed else 0
        per = _int8_scratch(layout, streamed)
        return layout.decoded_bytes, scales + per * _chunk_elements(count, max(1, per))
    per = 8 + (itemsize if streamed else 0)  # int64 indices (, values)
    deltas = 4 * layout.k if streamed else 0
    return layout.decoded_bytes, deltas + per * _chunk_elements(layout.k, per)


def decode_tensor(layout: TensorLayout, source: SegmentSource) -> npt.NDArray[Any]:
    """Decode one tensor from the next ``layout.length`` bytes of ``source``.

    Allocates exactly what :func:`decode_footprint` says.  ``raw`` tensors without
    shuffle from an unstreamed source come back as views of the body (read-only when
    the body is).

    Raises:
        MalformedMessageError: non-finite int8 scales; topk indices out of range or not
            strictly increasing.
        DecompressionError: a streamed source ended early or is corrupt.
    """
    if layout.codec == "raw":
        flat = _decode_raw(layout, source)
    elif layout.codec == "fp16":
        flat = _decode_fp16(layout, source)
    elif layout.codec == "int8":
        # Scales are finite but a peer's may be huge: values beyond the dtype decode to
        # Inf without a warning (an update holding them is refused as non-finite).
        with np.errstate(over="ignore", invalid="ignore"):
            flat = _decode_int8(layout, source)
    else:
        flat = _decode_topk(layout, source)
    return flat.reshape(layout.shape)


def _decode_raw(layout: TensorLayout, source: SegmentSource) -> npt.NDArray[Any]:
    dtype, count = layout.dtype, layout.count
    if not _shuffled_raw(layout):
        if not source.streamed:
            return np.frombuffer(source.take(layout.length, None), dtype=dtype, count=count)
        result = np.empty(count, dtype)
        source.take(layout.length, result.view(np.uint8))  # decompressed in place: no copy
        return result
    result = np.empty(count, dtype)
    # Byte plane p holds byte p of every element: write each plane with a stride.
    interleaved = result.view(np.uint8).reshape(count, dtype.itemsize)
    step = _chunk_elements(count, 1)
    scratch = np.empty(step, np.uint8) if source.streamed else None
    for plane in range(dtype.itemsize):
        for start in range(0, count, step):
            stop = min(count, start + step)
            chunk = source.take(stop - start, scratch)
            interleaved[start:stop, plane] = np.frombuffer(chunk, np.uint8)
    return result


def _decode_fp16(layout: TensorLayout, source: SegmentSource) -> npt.NDArray[Any]:
    count = layout.count
    result = np.empty(count, layout.dtype)
    if not layout.shuffle:
        if not source.streamed:
            half = np.frombuffer(source.take(2 * count, None), dtype=HALF, count=count)
            np.copyto(result, half)
            return result
        step = _chunk_elements(count, 2)
        scratch = np.empty(2 * step, np.uint8)
        for start in range(0, count, step):
            stop = min(count, start + step)
            np.copyto(
                result[start:stop], np.frombuffer(source.take(2 * (stop - start), scratch), HALF)
            )
        return result
    # Shuffled: every low byte, then every high byte.  A streamed low plane is parked in
    # the last ``count`` bytes of the output itself: writing elements [start, stop)
    # overwrites bytes below ``itemsize * stop <= (itemsize - 1) * count + stop``, so
    # the low bytes of later elements survive until they are used.
    parked = result.view(np.uint8)[(layout.dtype.itemsize - 1) * count :]
    low_plane = np.frombuffer(source.take(count, parked), np.uint8)
    per = 4 if source.streamed else 2
    step = _chunk_elements(count, per)
    values = np.empty(step, HALF_BITS)
    low = np.empty(step, np.uint8) if source.streamed else None
    high_scratch = np.empty(step, np.uint8) if source.streamed else None
    for start in range(0, count, step):
        stop = min(count, start + step)
        size = stop - start
        lo = low_plane[start:stop]
        if low is not None:
            np.copyto(low[:size], lo)  # before this step's output overwrites it
            lo = low[:size]
        hi = np.frombuffer(source.take(size, high_scratch), np.uint8)
        bits = values[:size]
        np.left_shift(hi, 8, out=bits, dtype=HALF_BITS)
        np.bitwise_or(bits, lo, out=bits)
        np.copyto(result[start:stop], bits.view(HALF))
    return result


def _int8_scratch(layout: TensorLayout, streamed: bool) -> int:
    # Bytes per element of one step's scratch: the quantized bytes (streamed) and a
    # float32 work buffer unless the output itself is float32.
    return (1 if streamed else 0) + (0 if layout.dtype == FLOAT32 else 4)


def _decode_int8(layout: TensorLayout, source: SegmentSource) -> npt.NDArray[Any]:
    count, block = layout.count, layout.block
    nblocks = math.ceil(count / block)
    into = np.empty(4 * nblocks, np.uint8) if source.streamed else None
    scales = np.frombuffer(source.take(4 * nblocks, into), dtype="<f4")
    if not np.isfinite(scales).all():
        raise MalformedMessageError(f"int8 tensor {layout.name!r} has non-finite scales")
    result = np.empty(count, layout.dtype)
    step = _chunk_elements(count, max(1, _int8_scratch(layout, source.streamed)))
    whole_blocks = block <= step
    if whole_blocks:
        step -= step % block  # every step starts on a block boundary
    scratch = np.empty(step, np.uint8) if source.streamed else None
    # Dequantised in float32 (what the encoder's error bound assumes), then cast.
    work_buffer = None if layout.dtype == FLOAT32 else np.empty(step, FLOAT32)
    start = 0
    while start < count:
        stop = min(count, start + step)
        if not whole_blocks:
            stop = min(stop, (start // block + 1) * block)  # a step stays inside one block
        out = result[start:stop]
        work = out if work_buffer is None else work_buffer[: stop - start]
        np.copyto(work, np.frombuffer(source.take(stop - start, scratch), np.int8))
        first = start // block
        if whole_blocks:
            rows = (stop - start) // block
            full = rows * block
            if rows:
                work[:full].reshape(rows, block)[...] *= scales[first : first + rows, None]
            if full < stop - start:
                work[full:] *= scales[first + rows]
        else:
            work *= scales[first]
        if work is not out:
            np.copyto(out, work)
        start = stop
    return result


def _decode_topk(layout: TensorLayout, source: SegmentSource) -> npt.NDArray[Any]:
    count, k, dtype = layout.count, layout.k, layout.dtype
    into = np.empty(4 * k, np.uint8) if source.streamed else None
    deltas = np.frombuffer(source.take(4 * k, into), dtype="<u4")
    if k > 1 and int(deltas[1:].min()) == 0:
        raise MalformedMessageError(f"topk tensor {layout.name!r}: indices not increasing")
    dense = np.zeros(count, dtype=dtype)
    per = 8 + (dtype.itemsize if source.streamed else 0)
    step = _chunk_elements(k, per)
    indices = np.empty(step, np.int64)
    scratch = np.empty(step * dtype.itemsize, np.uint8) if source.streamed else None
    base = 0
    for start in range(0, k, step):
        stop = min(k, start + step)
        index = indices[: stop - start]
        np.cumsum(deltas[start:stop], dtype=np.int64, out=index)
        index += base
        base = int(index[-1])
        if base >= count:
            raise MalformedMessageError(
                f"topk tensor {layout.name!r}: index {base} beyond {count} elements"
            )
        dense[index] = np.frombuffer(source.take((stop - start) * dtype.itemsize, scratch), dtype)
    return dense
