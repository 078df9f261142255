"""Chunk messages: one MQTT payload carrying one chunk of a blob or of an update.

A chunk is a frame (:mod:`fedmq.wire.framing`) whose header says which blob it belongs
to, where it sits, and the crc32 of its payload, so a corrupted chunk is rejected on
arrival (and fetched again) instead of spoiling the whole blob's sha256 check::

    kind: "blob_chunk" | "update_chunk"
    fed, sender, round          federation, publisher id, round number
    sha (32 bytes), size, csz   the blob's sha256, total size, chunk size
    idx, n, crc                 chunk index, chunk count, crc32 of the payload
    uid                         update id (update chunks only): dedupes re-sends
    sig                         the device's Ed25519 signature of the update statement
                                (update chunks, when the device has a signing key)
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from fedmq.buffers import Buffer
from fedmq.errors import (
    IntegrityError,
    InvalidIdentifierError,
    LimitExceededError,
    LocalProtocolError,
    MalformedMessageError,
)
from fedmq.wire.blobs import BlobRef, split_blob
from fedmq.wire.framing import decode_frame, encode_frame, require, require_int
from fedmq.wire.ids import MAX_ID_LENGTH, id_problem, validate_id
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits
from fedmq.wire.signing import SIGNATURE_BYTES
from fedmq.wire.topics import MAX_ROUND

ChunkKind = Literal["blob", "update"]
_FRAME_KINDS: dict[str, ChunkKind] = {"blob_chunk": "blob", "update_chunk": "update"}


@dataclass(frozen=True)
class ChunkHeader:
    """Where one chunk belongs.

    Args:
        kind: ``blob`` (aggregator → agents) or ``update`` (agent → aggregator).
        federation: federation id.
        sender: id of the publishing client (the aggregator's id for blobs).
        round: round the blob or update belongs to.
        blob: reference of the whole blob.
        index: position of this chunk.
        update_id: identifies one update across re-sends (update chunks only).
        signature: the sender's signature of
            :func:`~fedmq.wire.signing.update_statement` (update chunks only; every
            chunk carries it, so the first one to arrive can be checked).
    """

    kind: ChunkKind
    federation: str
    sender: str
    round: int
    blob: BlobRef
    index: int
    update_id: str | None = None
    signature: bytes | None = None


@dataclass(frozen=True)
class Chunk:
    """A decoded chunk: its header and a zero-copy view of its payload."""

    header: ChunkHeader
    payload: memoryview


def encode_chunk(header: ChunkHeader, payload: Buffer) -> bytes:
    """Encode one chunk message.

    Raises:
        LocalProtocolError: ids are invalid, the index/length disagree with the blob
            reference, or an update chunk lacks its update id.
    """
    validate_id(header.federation, "federation id")
    validate_id(header.sender, "sender id")
    if header.kind == "update":
        if header.update_id is None:
            raise LocalProtocolError("update chunks need an update id")
        validate_id(header.update_id, "update id")
    if not 0 <= header.round < MAX_ROUND:
        raise LocalProtocolError(f"round {header.round} out of range")
    view = memoryview(payload).cast("B")
    try:
        expected = header.blob.chunk_length(header.index)
    except MalformedMessageError as exc:
        raise LocalProtocolError(str(exc)) from exc
    if len(view) != expected:
        raise LocalProtocolError(
            f"chunk {header.index} payload is {len(view)} bytes, the blob layout needs {expected}"
        )
    fields: dict[str, Any] = {
        "fed": header.federation,
        "sender": header.sender,
        "round": header.round,
        "sha": bytes.fromhex(header.blob.sha256),
        "size": header.blob.size,
        "csz": header.blob.chunk_size,
        "idx": header.index,
        "n": header.blob.count,
        "crc": zlib.crc32(view),
    }
    if header.update_id is not None:
        fields["uid"] = header.update_id
    if header.signature is not None:
        if header.kind != "update" or len(header.signature) != SIGNATURE_BYTES:
            raise LocalProtocolError("only update chunks carry a 64-byte signature")
        fields["sig"] = header.signature
    return encode_frame(f"{header.kind}_chunk", fields, view)


@functools.cache
def chunk_overhead() -> int:
    """The most bytes a chunk message adds to its payload (worst-case header fields)."""
    longest = "x" * MAX_ID_LENGTH
    ref = BlobRef("f" * 64, 2**62, 2**40)
    header = ChunkHeader(
        "update", longest, longest, MAX_ROUND - 1, ref, 2**40 - 1, longest, bytes(64)
    )
    probe = BlobRef("f" * 64, 1, 1024)
    message = encode_chunk(replace(header, blob=probe, index=0), b"\0")
    # Integers grow by at most 8 bytes each in msgpack: size, csz, idx, n (the probe's
    # are small), plus the body length in the frame header.
    return len(message) - 1 + 5 * 8


def encode_blob_chunks(
    data: Buffer,
    ref: BlobRef,
    *,
    kind: ChunkKind,
    federation: str,
    sender: str,
    round_id: int,
    update_id: str | None = None,
    signature: bytes | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(index, message)`` for every chunk of ``data``."""
    for index, part in enumerate(split_blob(data, ref)):
        header = ChunkHeader(kind, federation, sender, round_id, ref, index, update_id, signature)
        yield index, encode_chunk(header, part)


def _checked_id(header: dict[str, Any], name: str, what: str) -> str:
    value = require(header, name, str)
    problem = id_problem(value)
    if problem is not None:
        raise MalformedMessageError(f"{what} {value!r} {problem}")
    return value


def decode_chunk(data: Buffer, limits: DecodeLimits = DEFAULT_LIMITS) -> Chunk:
    """Decode and verify one chunk message.

    Raises:
        LimitExceededError: the message, blob or chunk count exceed ``limits``.
        IntegrityError: the payload's crc32 does not match the header.
        DecodeError: (a subclass naming the problem) for anything else malformed.
    """
    view = memoryview(data).cast("B")
    if len(view) > limits.max_message_bytes:
        raise LimitExceededError("message size", len(view), limits.max_message_bytes)
    fields, payload = decode_frame(view, limits)
    frame_kind = require(fields, "kind", str)
    kind = _FRAME_KINDS.get(frame_kind)
    if kind is None:
        raise MalformedMessageError(f"expected a chunk message, got kind {frame_kind!r}")
    federation = _checked_id(fields, "fed", "federation id")
    sender = _checked_id(fields, "sender", "sender id")
    round_id = require_int(fields, "round", 0, MAX_ROUND)
    sha = require(fields, "sha", bytes)
    if len(sha) != 32:
        raise MalformedMessageError(f"blob sha256 must be 32 bytes, got {len(sha)}")
    size = require_int(fields, "size", 0, 2**63)
    chunk_size = require_int(fields, "csz", 1, 2**63)
    try:
        ref = BlobRef(sha.hex(), size, chunk_size)
    except InvalidIdentifierError as exc:
        raise MalformedMessageError(str(exc)) from exc
    ref.check_limits(limits)
    count = require_int(fields, "n", 1, 2**63)
    if count != ref.count:
        raise MalformedMessageError(
            f"header says {count} chunks, but {size} bytes in {chunk_size}-byte chunks make "
            f"{ref.count}"
        )
    index = require_int(fields, "idx", 0, count)
    expected = ref.chunk_length(index)
    if len(payload) != expected:
        raise MalformedMessageError(
            f"chunk {index} payload is {len(payload)} bytes, the blob layout needs {expected}"
        )
    crc = require_int(fields, "crc", 0, 2**32)
    if zlib.crc32(payload) != crc:
        raise IntegrityError(f"chunk {index} of blob {ref.sha256[:12]}… fails its crc32 check")
    update_id: str | None = None
    signature: bytes | None = None
    if kind == "update":
        update_id = _checked_id(fields, "uid", "update id")
        if "sig" in fields:
            signature = require(fields, "sig", bytes)
            if len(signature) != SIGNATURE_BYTES:
                raise MalformedMessageError(
                    f"update signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}"
                )
    header = ChunkHeader(kind, federation, sender, round_id, ref, index, update_id, signature)
    return Chunk(header, payload)
