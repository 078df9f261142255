"""File archives: a few named files as one blob (how a model bundle travels).

A frame of kind ``archive`` whose header lists ``[name, length]`` pairs in body order.
Names are plain file names (no directories), so unpacking can never write outside
the target directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fedmq.buffers import Buffer
from fedmq.errors import LimitExceededError, LocalProtocolError, MalformedMessageError
from fedmq.wire.framing import decode_frame, encode_frame, require
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits

KIND = "archive"
MAX_FILES = 64  # a bundle has a handful of files
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_name(name: object, error: type[Exception]) -> str:
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise error(f"archive member name {name!r} is not a plain file name")
    return name


def pack_files(files: Mapping[str, Buffer]) -> bytes:
    """Pack ``files`` (name → content) into one archive, in sorted name order.

    Sorting makes the archive, and so its sha256, independent of insertion order.
    """
    if len(files) > MAX_FILES:
        raise LocalProtocolError(f"{len(files)} files, over the limit of {MAX_FILES}")
    names = sorted(_check_name(name, LocalProtocolError) for name in files)
    entries = [[name, memoryview(files[name]).nbytes] for name in names]
    return encode_frame(KIND, {"files": entries}, [files[name] for name in names])


def unpack_files(data: Buffer, limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, memoryview]:
    """Unpack an archive into name → zero-copy view of the content.

    Raises:
        DecodeError: (a subclass naming the problem) for any malformed archive.
    """
    header, body = decode_frame(data, limits, expected_kind=KIND)
    entries: list[Any] = require(header, "files", list)
    if len(entries) > MAX_FILES:
        raise LimitExceededError("archive member count", len(entries), MAX_FILES)
    files: dict[str, memoryview] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            raise MalformedMessageError(f"archive entry {entry!r} is not [name, length]")
        name = _check_name(entry[0], MalformedMessageError)
        length = entry[1]
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise MalformedMessageError(f"archive member {name!r} has invalid length {length!r}")
        if name in files:
            raise MalformedMessageError(f"archive repeats member {name!r}")
        if offset + length > len(body):
            raise MalformedMessageError(f"archive member {name!r} runs past the body")
        files[name] = body[offset : offset + length]
        offset += length
    if offset != len(body):
        raise MalformedMessageError(f"{len(body) - offset} bytes in the archive belong to no file")
    return files
