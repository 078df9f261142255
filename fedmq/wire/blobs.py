"""Content-addressed blobs: split into chunks, reassembled in any order, verified by sha256.

:class:`BlobRef` holds the checks every chunk store applies (:meth:`BlobRef.check_chunk`,
:meth:`BlobRef.check_complete`, :meth:`BlobRef.verify`): the in-memory
:class:`BlobAssembler` here and the agent's disk-backed store refuse the same chunks
with the same messages.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from fedmq.buffers import Buffer
from fedmq.errors import (
    IntegrityError,
    InvalidIdentifierError,
    LimitExceededError,
    LocalProtocolError,
    MalformedMessageError,
)
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits, KiB

DEFAULT_CHUNK_SIZE = 256 * KiB  # bytes: few messages per MB yet well under broker caps
MIN_CHUNK_SIZE = 1 * KiB
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BlobRef:
    """Names a blob and how it is chunked: enough to subscribe to it and reassemble it.

    Args:
        sha256: lowercase hex sha256 of the whole blob.
        size: blob length in bytes.
        chunk_size: bytes per chunk (the last chunk holds the remainder).
    """

    sha256: str
    size: int
    chunk_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise InvalidIdentifierError(f"blob id {self.sha256!r} is not a lowercase hex sha256")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise InvalidIdentifierError(f"blob size {self.size!r} must be a non-negative int")
        if (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, int)
            or self.chunk_size < 1
        ):
            raise InvalidIdentifierError(f"chunk size {self.chunk_size!r} must be a positive int")

    @property
    def count(self) -> int:
        """Number of chunks (an empty blob is one empty chunk)."""
        return max(1, math.ceil(self.size / self.chunk_size))

    def chunk_length(self, index: int) -> int:
        """Length in bytes of chunk ``index``."""
        if not 0 <= index < self.count:
            raise MalformedMessageError(f"chunk index {index} outside [0, {self.count})")
        if index < self.count - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.count - 1)

    def chunk_span(self, index: int) -> slice:
        """Where chunk ``index`` lies in the blob's bytes."""
        start = index * self.chunk_size
        return slice(start, start + self.chunk_length(index))

    def check_chunk(self, index: int, payload: Buffer) -> memoryview:
        """Return ``payload`` as a byte view if it can be chunk ``index`` of this blob.

        Every chunk store (the in-memory :class:`BlobAssembler`, the agent's disk cache)
        takes chunks through this one check, so they refuse exactly the same chunks.

        Raises:
            MalformedMessageError: the index is out of range or the length is wrong.
        """
        expected = self.chunk_length(index)
        view = memoryview(payload).cast("B")
        if len(view) != expected:
            raise MalformedMessageError(
                f"chunk {index} of blob {self.sha256[:12]} is {len(view)} bytes, "
                f"expected {expected}"
            )
        return view

    def check_complete(self, received: int) -> None:
        """Raise MalformedMessageError unless ``received`` distinct chunks are all of them."""
        if received != self.count:
            raise MalformedMessageError(
                f"blob {self.sha256[:12]} is missing {self.count - received} of {self.count} chunks"
            )

    def verify(self, data: Buffer) -> None:
        """Raise IntegrityError unless ``data`` hashes to this blob's sha256."""
        digest = sha256_hex(data)
        if digest != self.sha256:
            raise IntegrityError(
                f"blob reassembled to sha256 {digest[:12]}…, expected {self.sha256[:12]}…"
            )

    def check_limits(self, limits: DecodeLimits) -> None:
        """Raise LimitExceededError if receiving this blob would exceed ``limits``."""
        if self.size > limits.max_blob_bytes:
            raise LimitExceededError("declared blob size", self.size, limits.max_blob_bytes)
        if self.count > limits.max_chunks:
            raise LimitExceededError("declared chunk count", self.count, limits.max_chunks)


def sha256_hex(data: Buffer) -> str:
    """Lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def blob_ref(data: Buffer, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobRef:
    """Return the reference of ``data`` chunked at ``chunk_size`` bytes."""
    if chunk_size < MIN_CHUNK_SIZE:
        raise LocalProtocolError(f"chunk size {chunk_size} is below the minimum {MIN_CHUNK_SIZE}")
    view = memoryview(data).cast("B")
    return BlobRef(sha256_hex(view), len(view), chunk_size)


def split_blob(data: Buffer, ref: BlobRef) -> Iterator[memoryview]:
    """Yield the chunks of ``data`` as zero-copy views, in order."""
    view = memoryview(data).cast("B")
    if len(view) != ref.size:
        raise LocalProtocolError(f"blob is {len(view)} bytes, its reference says {ref.size}")
    for index in range(ref.count):
        yield view[ref.chunk_span(index)]


class BlobAssembler:
    """Collect the chunks of one blob in any order, with duplicates, then verify it.

    Memory is allocated once, for the declared size, after checking it against limits.
    """

    def __init__(self, ref: BlobRef, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        ref.check_limits(limits)
        self.ref = ref
        self._buffer = bytearray(ref.size)
        self._have = bytearray(ref.count)  # 1 per chunk received
        self._missing = ref.count

    @property
    def complete(self) -> bool:
        """True when every chunk has arrived."""
        return self._missing == 0

    @property
    def received(self) -> int:
        """Number of distinct chunks received."""
        return self.ref.count - self._missing

    def missing(self) -> list[int]:
        """Indices of chunks not yet received, ascending."""
        return [index for index, have in enumerate(self._have) if not have]

    def add(self, index: int, payload: Buffer) -> bool:
        """Store chunk ``index``; return False if it was a duplicate (ignored).

        Raises:
            MalformedMessageError: the index is out of range or the length is wrong.
        """
        view = self.ref.check_chunk(index, payload)
        if self._have[index]:
            return False
        self._buffer[self.ref.chunk_span(index)] = view
        self._have[index] = 1
        self._missing -= 1
        return True

    def forget(self, index: int) -> None:
        """Drop chunk ``index`` so it can be received again (e.g. after a failed verify)."""
        if self._have[index]:
            self._have[index] = 0
            self._missing += 1

    def finish(self) -> bytearray:
        """Return the verified blob (the assembler's own buffer, not a copy).

        Raises:
            MalformedMessageError: chunks are still missing.
            IntegrityError: the reassembled bytes do not hash to the blob's sha256; every
                chunk is forgotten so the blob can be fetched again.
        """
        self.ref.check_complete(self.received)
        try:
            self.ref.verify(self._buffer)
        except IntegrityError:
            self._have = bytearray(self.ref.count)
            self._missing = self.ref.count
            raise
        return self._buffer
