"""Tensor sets: an ordered mapping name → ndarray as one compressed binary message.

A tensor set is a frame (see :mod:`fedmq.wire.framing`) of kind ``tensors``::

    header: {"tensors": [entry, ...], "compression": "zstd" | "none", "raw_len": N}
    body:   zstd(segment_0 ‖ pad ‖ segment_1 ‖ pad ‖ ...)   (or uncompressed)

Each entry names a tensor's dtype, shape, codec and segment length
(:mod:`fedmq.wire.tensor_codecs`); segments start on 8-byte boundaries so decoded arrays
are aligned.  Decoding checks every declared size against :class:`DecodeLimits` before it
allocates or decompresses anything, including the memory decoding itself will take
(:func:`decode_tensors`): its peak allocation never exceeds ``max_decoded_bytes``.
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
from fedmq.wire.tensor_codecs import RAW, CodecSpec, encode_tensor
from fedmq.wire.tensor_decoding import (
    TensorLayout,
    decode_footprint,
    decode_tensor,
    decodes_as_view,
    parse_entry,
)

KIND = "tensors"
ALIGNMENT = 8  # bytes: float64/int64 views stay aligned within the decoded body
DEFAULT_ZSTD_LEVEL = 1  # measured on deltas: shuffled floats compress best *and* fastest at 1
ZSTD_WILDCOPY = 64  # bytes zstd's decoder adds to its window ring (2 x WILDCOPY_OVERLENGTH)

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


class _BodyView:
    """An uncompressed body: segments are views of it (no copy)."""

    streamed = False

    def __init__(self, body: memoryview) -> None:
        self._body = body
        self._offset = 0

    def take(self, size: int, into: npt.NDArray[np.uint8] | None) -> memoryview:
        start = self._offset
        self._offset += size
        return self._body[start : self._offset]

    def finish(self) -> None:
        """Nothing to check: the body length was checked against the entries."""


class _ZstdStream:
    """A zstd body decompressed segment by segment into the decoder's own buffers.

    Never holds the decompressed body: each segment goes straight into its output array
    (or a bounded scratch buffer), so decoding allocates what
    :func:`~fedmq.wire.tensor_decoding.decode_footprint` says and no more.
    """

    streamed = True

    def __init__(self, body: memoryview) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=False)

    def take(self, size: int, into: npt.NDArray[np.uint8] | None) -> memoryview:
        assert into is not None, "a streamed body needs a buffer to decompress into"
        target = into.data[:size]  # a memoryview of the array
        filled = 0
        while filled < size:
            try:
                got = self._reader.readinto(target[filled:])
            except zstandard.ZstdError as exc:
                raise DecompressionError(f"tensor body does not decompress: {exc}") from exc
            if not got:
                raise DecompressionError(
                    "tensor body decompressed to fewer bytes than its header declares"
                )
            filled += got
        return target

    def finish(self) -> None:
        """Check the frame ends exactly where the declared content does (and its checksum)."""
        try:
            extra = self._reader.read(1)
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"tensor body does not decompress: {exc}") from exc
        if extra:
            raise DecompressionError("tensor body decompresses to more bytes than declared")


def _zstd_frame_length(body: memoryview, max_blocks: int) -> int:
    # Walks the block headers (3 bytes each, RFC 8878 3.1.1.2): the frame's compressed
    # length, so bytes after the frame are refused as the one-shot decoder did.
    try:
        offset = zstandard.frame_header_size(body)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"tensor body is not a zstd frame: {exc}") from exc
    if offset > len(body):
        raise DecompressionError("tensor body ends inside its zstd frame header")
    checksum = 4 if body[4] & 0x04 else 0  # Content_Checksum_flag of the frame descriptor
    for _ in range(max_blocks):
        if offset + 3 > len(body):
            raise DecompressionError("tensor body ends inside its zstd frame")
        header = body[offset] | body[offset + 1] << 8 | body[offset + 2] << 16
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise DecompressionError("tensor body's zstd frame has a reserved block type")
        offset += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte
        if last:
            return offset + checksum
    raise DecompressionError(f"tensor body's zstd frame has more than {max_blocks} blocks")


def _zstd_frame(body: memoryview, raw_len: int, tensors: int) -> Any:
    """Check a zstd body's frame header and extent; return its parameters.

    The frame declares its content size and window, and zstandard allocates from them,
    so both are checked before anything is decompressed.
    """
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"tensor body is not a zstd frame: {exc}") from exc
    declared = params.content_size
    if declared not in (raw_len, zstandard.CONTENTSIZE_UNKNOWN):
        raise DecompressionError(
            f"zstd frame declares {declared} bytes of content, the header {raw_len}"
        )
    # An encoder cuts a block per window (>= 1 KiB) of content; allow a flush per tensor.
    max_blocks = raw_len // 1024 + 2 * tensors + 16
    length = _zstd_frame_length(body, max_blocks)
    if length != len(body):
        raise DecompressionError(f"tensor body holds {len(body)} bytes, its zstd frame {length}")
    return params


def _zstd_ring(params: Any) -> int:
    # What zstd's streaming decoder allocates (ZSTD_decodingBufferSize_min): an input
    # block and a window-sized ring, never more than the declared content.
    window = int(params.window_size)
    block = min(window, zstandard.BLOCKSIZE_MAX)
    ring = window + 2 * block + ZSTD_WILDCOPY
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN:
        ring = min(ring, int(params.content_size))
    return block + ring


def decode_tensors(
    data: Buffer, limits: DecodeLimits = DEFAULT_LIMITS
) -> dict[str, npt.NDArray[Any]]:
    """Decode a tensor set, checking every declared size against ``limits`` first.

    Bounded: before anything is allocated or decompressed, the memory decoding will
    allocate (the decoded arrays, the scratch of the largest tensor, zstd's window) is
    computed from the header and checked against ``limits.max_decoded_bytes``.  A zstd
    body is decompressed segment by segment straight into the output arrays (or, when
    every tensor is unshuffled ``raw``, in one go, its tensors views of it), never as a
    whole next to the arrays.  Uncompressed ``raw`` tensors are views into ``data``
    (read-only when ``data`` is); copy them before writing.

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
    if algorithm == "none":
        if len(body) != raw_len:
            raise MalformedMessageError(f"uncompressed body is {len(body)} bytes, not {raw_len}")
        _check_memory(layouts, 0, limits, streamed=False)
        return _decode_body(layouts, _BodyView(body))
    frame = _zstd_frame(body, raw_len, len(layouts))
    if frame.content_size == raw_len and all(decodes_as_view(layout) for layout in layouts):
        # Every tensor can be a view of the decompressed body: decompress it in one go
        # (no window ring, no copy); the body is exactly the memory the arrays need.
        _check_memory(layouts, raw_len, limits, streamed=False)
        try:
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"tensor body does not decompress: {exc}") from exc
        if len(raw) != raw_len:
            raise DecompressionError(f"tensor body decompressed to {len(raw)} bytes, not {raw_len}")
        return _decode_body(layouts, _BodyView(memoryview(raw)))
    _check_memory(layouts, _zstd_ring(frame), limits, streamed=True)
    return _decode_body(layouts, _ZstdStream(body))


def _check_memory(
    layouts: list[TensorLayout], buffers: int, limits: DecodeLimits, *, streamed: bool
) -> None:
    """Refuse a tensor set whose decoding would allocate more than ``max_decoded_bytes``.

    ``buffers``: what the body itself takes (a decompressed body, zstd's window ring).
    """
    footprints = [decode_footprint(layout, streamed=streamed) for layout in layouts]
    memory = buffers + sum(kept for kept, _ in footprints)
    memory += max((scratch for _, scratch in footprints), default=0)
    if memory > limits.max_decoded_bytes:
        raise LimitExceededError("decoding memory", memory, limits.max_decoded_bytes)


def _decode_body(
    layouts: list[TensorLayout], source: _BodyView | _ZstdStream
) -> dict[str, npt.NDArray[Any]]:
    padding = np.empty(ALIGNMENT, np.uint8) if source.streamed else None
    result: dict[str, npt.NDArray[Any]] = {}
    for layout in layouts:
        result[layout.name] = decode_tensor(layout, source)
        pad = _padding(layout.length)
        if pad:
            source.take(pad, padding)
    source.finish()
    return result
