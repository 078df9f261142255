"""Binary framing shared by every binary fedmq message.

::

    offset  size  field
    0       3     magic b"FMQ"
    3       1     format version (1)
    4       4     header length H, unsigned big-endian
    8       H     msgpack map: "kind", "body_len" and kind-specific fields
    8+H     B     body (B = header["body_len"] bytes exactly)

The header declares the body length, so any truncation is detected as such, and
trailing bytes are rejected.  The body is returned as a ``memoryview`` into the input
(no copy).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgpack

from fedmq.buffers import Buffer
from fedmq.errors import (
    LimitExceededError,
    LocalProtocolError,
    MalformedMessageError,
    TruncatedMessageError,
    UnsupportedVersionError,
)
from fedmq.wire.limits import DecodeLimits

MAGIC = b"FMQ"
FORMAT_VERSION = 1
_PREFIX = struct.Struct(">3sBI")
PREFIX_SIZE = _PREFIX.size

T = TypeVar("T")


def encode_frame(
    kind: str, header: Mapping[str, Any], body: Buffer | Sequence[Buffer] = b""
) -> bytes:
    """Return one framed message: prefix, msgpack header (plus kind and body length), body.

    ``body`` may be a sequence of buffers, joined without an intermediate copy.
    """
    parts: list[Buffer] = list(body) if isinstance(body, list | tuple) else [body]  # type: ignore[list-item]
    fields = dict(header)
    fields["kind"] = kind
    fields["body_len"] = sum(memoryview(part).nbytes for part in parts)
    try:
        packed = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {kind} header: {exc}") from exc
    return b"".join((_PREFIX.pack(MAGIC, FORMAT_VERSION, len(packed)), packed, *parts))


def decode_frame(
    data: Buffer, limits: DecodeLimits, *, expected_kind: str | None = None
) -> tuple[dict[str, Any], memoryview]:
    """Split a framed message into its header map and a zero-copy view of its body.

    Raises:
        TruncatedMessageError: fewer bytes than the prefix or header declare.
        UnsupportedVersionError: not a fedmq frame, or an unknown format version.
        LimitExceededError: the header is larger than ``limits.max_header_bytes``.
        MalformedMessageError: the header is not a msgpack map, lacks ``kind``/``body_len``,
            has the wrong kind, or bytes follow the body.
    """
    view = memoryview(data).cast("B")
    if len(view) < PREFIX_SIZE:
        raise TruncatedMessageError(
            f"message is {len(view)} bytes, shorter than the {PREFIX_SIZE}-byte frame prefix"
        )
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise UnsupportedVersionError(f"not a fedmq message: magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"frame format version {version} is not supported (this fedmq speaks "
            f"{FORMAT_VERSION}); upgrade the older side"
        )
    if header_len > limits.max_header_bytes:
        raise LimitExceededError("declared header length", header_len, limits.max_header_bytes)
    header_end = PREFIX_SIZE + header_len
    if len(view) < header_end:
        raise TruncatedMessageError(
            f"message ends at byte {len(view)} inside its {header_len}-byte header"
        )
    try:
        header = msgpack.unpackb(
            view[PREFIX_SIZE:header_end],
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    # msgpack reports garbage as ValueError subclasses (ExtraData, FormatError, StackError,
    # UnicodeDecodeError) and unhashable map keys as TypeError.
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedMessageError(f"frame header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise MalformedMessageError(
            f"frame header must be a msgpack map, got {type(header).__name__}"
        )
    kind = require(header, "kind", str)
    if expected_kind is not None and kind != expected_kind:
        raise MalformedMessageError(f"expected a {expected_kind!r} message, got {kind!r}")
    body_len = require_int(header, "body_len", 0, 2**63)
    available = len(view) - header_end
    if available < body_len:
        raise TruncatedMessageError(
            f"{kind} body is {available} bytes, but the header declares {body_len}"
        )
    if available > body_len:
        raise MalformedMessageError(
            f"{available - body_len} unexpected bytes after the {kind} body"
        )
    return header, view[header_end:]


def require(header: Mapping[str, Any], name: str, kind: type[T]) -> T:
    """Return ``header[name]`` if present and of type ``kind``, else raise MalformedMessageError."""
    if name not in header:
        raise MalformedMessageError(f"header field {name!r} is missing")
    value = header[name]
    # bool is an int subclass; a boolean where a number belongs is a malformed header.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedMessageError(
            f"header field {name!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def require_int(header: Mapping[str, Any], name: str, low: int, high: int) -> int:
    """Return integer field ``name`` if ``low <= value < high``; else MalformedMessageError."""
    value = require(header, name, int)
    if not low <= value < high:
        raise MalformedMessageError(f"header field {name!r} = {value} is outside [{low}, {high})")
    return value
