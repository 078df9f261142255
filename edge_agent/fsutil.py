"""Crash-safe file writes for the agent's state directory.

A device loses power without warning, so every file the agent relies on after a restart
is written to a temporary name, fsync'd, renamed over the target and the directory
fsync'd: after a crash the target holds either the old or the new content, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from fedmq.wire.framing import Buffer

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename or unlink) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: Buffer, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` without leaving a partial file behind.

    Args:
        path: target file; its directory must exist.
        data: the new content.
        durable: fsync the file and its directory; False for files that are verified on
            read anyway (blob chunks), where a lost write only costs a re-download.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree if it exists (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
