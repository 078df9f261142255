"""Tensor sets: an ordered mapping name → ndarray as one compressed binary message.

A tensor set is a frame (see :mod:`fedmq.wire.framing`) of kind ``tensors``::

    header: {"tensors": [entry, ...], "compression": "zstd" | "none", "raw_len": N}
    body:   zstd(segment_0 ‖ pad ‖ segment_1 ‖ pad ‖ ...)   (or uncompressed)

Each entry names a tensor's dtype, shape, codec and segment length
(:mod:`fedmq.wire.tensor_codecs`); segments start on 8-byte boundaries so decoded arrays
are aligned.  Decoding checks every declared size against :class:`DecodeLimits` before it
allocates or decompresses anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zstandard

from fedmq.buffers import Buffer
from fedmq.errors import (
    DecompressionError,
    LimitExceededError,
    LocalProtocolError,
    MalformedMessageError,
    UnsupportedCodecError,
)
from fedmq.wire.framing import decode_frame, encode_frame, require, require_int
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits
from fedmq.wire.tensor_codecs import RAW, CodecSpec, decode_tensor, encode_tensor, parse_entry

KIND = "tensors"
ALIGNMENT = 8  # bytes: float64/int64 views stay aligned within the decoded body
DEFAULT_ZSTD_LEVEL = 1  # measured on deltas: shuffled floats compress best *and* fastest at 1

CompressionName = Literal["zstd", "none"]


@dataclass(frozen=True)
class Compression:
    """Whole-body compression of a tensor set.

    Args:
        algorithm: ``zstd`` or ``none``.
        level: zstd level (1-22).
        shuffle: byte-plane shuffle multi-byte raw/fp16 tensors before compressing.
    """

    algorithm: CompressionName = "zstd"
    level: int = DEFAULT_ZSTD_LEVEL
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ("zstd", "none"):
            raise UnsupportedCodecError(f"unknown compression {self.algorithm!r}")
        if not 1 <= self.level <= 22:
            raise LocalProtocolError(f"zstd level {self.level} must be in [1, 22]")


NO_COMPRESSION = Compression("none", shuffle=False)


@dataclass
class EncodedTensorSet:
    """An encoded tensor set and, for lossy codecs, what encoding lost per tensor."""

    data: bytes
    lost: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    raw_len: int = 0


def _padding(length: int) -> int:
    return -length % ALIGNMENT


def encode_tensors(
    tensors: Mapping[str, npt.NDArray[Any]],
    codec: CodecSpec = RAW,
    *,
    overrides: Mapping[str, CodecSpec] | None = None,
    compression: Compression | None = None,
) -> EncodedTensorSet:
    """Encode ``tensors`` (order preserved) with ``codec``, per-name ``overrides``.

    Returns:
        The message bytes and, for every tensor encoded lossily, ``original - decoded``.

    Raises:
        LocalProtocolError: a name is unusable or a codec cannot encode a tensor.
        UnsupportedDtypeError: a tensor's dtype is not transportable.
    """
    compression = compression or Compression()
    shuffle = compression.shuffle and compression.algorithm != "none"
    overrides = overrides or {}
    entries: list[dict[str, Any]] = []
    segments: list[bytes | memoryview] = []
    lost: dict[str, npt.NDArray[Any]] = {}
    raw_len = 0
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise LocalProtocolError(f"tensor names must be non-empty strings, got {name!r}")
        encoded = encode_tensor(
            name, np.asarray(array), overrides.get(name, codec), shuffle=shuffle
        )
        length = sum(len(memoryview(part).cast("B")) for part in encoded.segments)
        encoded.entry["len"] = length
        entries.append(encoded.entry)
        segments.extend(encoded.segments)
        pad = _padding(length)
        if pad:
            segments.append(b"\0" * pad)
        raw_len += length + pad
        if encoded.lost is not None:
            lost[name] = encoded.lost
    header: dict[str, Any] = {
        "tensors": entries,
        "compression": compression.algorithm,
        "raw_len": raw_len,
    }
    if compression.algorithm == "zstd":
        compressor = zstandard.ZstdCompressor(level=compression.level, write_content_size=True)
        stream = compressor.compressobj(size=raw_len)
        parts = [stream.compress(segment) for segment in segments]
        parts.append(stream.flush())
        return EncodedTensorSet(encode_frame(KIND, header, parts), lost, raw_len)
    return EncodedTensorSet(encode_frame(KIND, header, segments), lost, raw_len)


def _decompress(body: memoryview, raw_len: int) -> bytes | memoryview:
    # A zstd frame may declare its content size; zstandard then allocates that much no
    # matter what max_output_size says, so the declared size is checked first.
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"tensor body is not a zstd frame: {exc}") from exc
    if declared not in (raw_len, zstandard.CONTENTSIZE_UNKNOWN):
        raise DecompressionError(
            f"zstd frame declares {declared} bytes of content, the header {raw_len}"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(
            body, max_output_size=raw_len, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"tensor body does not decompress: {exc}") from exc
    if len(raw) != raw_len:
        raise DecompressionError(f"tensor body decompressed to {len(raw)} bytes, not {raw_len}")
    return raw


def decode_tensors(
    data: Buffer, limits: DecodeLimits = DEFAULT_LIMITS
) -> dict[str, npt.NDArray[Any]]:
    """Decode a tensor set, checking every declared size against ``limits`` first.

    Uncompressed ``raw`` tensors are views into ``data`` (read-only when ``data`` is);
    copy them before writing.

    Raises:
        DecodeError: (a subclass naming what was wrong) for any malformed input.
    """
    header, body = decode_frame(data, limits, expected_kind=KIND)
    entries = require(header, "tensors", list)
    if len(entries) > limits.max_tensors:
        raise LimitExceededError("tensor count", len(entries), limits.max_tensors)
    algorithm = require(header, "compression", str)
    if algorithm not in ("zstd", "none"):
        raise UnsupportedCodecError(f"tensor body uses unknown compression {algorithm!r}")
    raw_len = require_int(header, "raw_len", 0, 2**63)
    if raw_len > limits.max_blob_bytes:
        raise LimitExceededError("declared tensor body size", raw_len, limits.max_blob_bytes)
    layouts = [parse_entry(entry, limits) for entry in entries]
    names = [layout.name for layout in layouts]
    if len(set(names)) != len(names):
        raise MalformedMessageError("tensor set repeats a tensor name")
    decoded_bytes = sum(layout.decoded_bytes for layout in layouts)
    if decoded_bytes > limits.max_decoded_bytes:
        raise LimitExceededError("decoded tensor bytes", decoded_bytes, limits.max_decoded_bytes)
    expected_len = sum(layout.length + _padding(layout.length) for layout in layouts)
    if expected_len != raw_len:
        raise MalformedMessageError(
            f"tensor entries need {expected_len} body bytes, the header declares {raw_len}"
        )
    if algorithm == "zstd":
        raw = memoryview(_decompress(body, raw_len))
    else:
        if len(body) != raw_len:
            raise MalformedMessageError(f"uncompressed body is {len(body)} bytes, not {raw_len}")
        raw = body
    result: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for layout in layouts:
        result[layout.name] = decode_tensor(layout, raw[offset : offset + layout.length])
        offset += layout.length + _padding(layout.length)
    return result
