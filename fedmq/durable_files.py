"""Crash-safe files for the state directories of the aggregator and the agents.

Devices and servers lose power without warning, so every file a service relies on after
a restart is written to a temporary name, fsync'd, renamed over the target and the
directory fsync'd: after a crash the target holds the old or the new content, never a
mix.  A state directory is owned by one process at a time, through an exclusive lock.

This module is the only place fedmq writes such files: :func:`write_file` for one file,
:func:`write_files` for a batch that shares its fsyncs, :func:`remove_temporaries` for
what a crash mid-write left behind, and :func:`lock_directory` for ownership.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from fedmq.buffers import Buffer

TMP_SUFFIX = ".tmp"
LOCK_FILE = "LOCK"


def temp_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before its rename."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def lock_directory(root: Path) -> int:
    """Create ``root`` if needed and take its exclusive lock; return the lock's descriptor.

    Closing the descriptor releases the lock (so does the process dying).

    Raises:
        BlockingIOError: another process holds the lock.
        OSError: the directory or its lock file cannot be created.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename or unlink) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: Buffer, *, sync: bool) -> Path:
    """Write ``data`` under ``path``'s temporary name (fsync'd if ``sync``); return that name."""
    temp = temp_path(path)
    with open(temp, "wb") as handle:
        handle.write(data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    return temp


def fsync_file(path: Path) -> None:
    """Flush a file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
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
    os.replace(_write_temp(path, data, sync=durable), path)
    if durable:
        fsync_dir(path.parent)


def write_files(files: Sequence[tuple[Path, Buffer]]) -> None:
    """Durably write several files, as :func:`write_file` does one, sharing the fsyncs.

    Everything is written first and fsync'd after: the first fsync's journal commit
    flushes most of the batch, so the others return quickly (a group commit).  Then every
    temporary is renamed over its target and each directory is fsync'd once.

    Args:
        files: ``(target, content)`` pairs; the targets' directories must exist.

    Raises:
        OSError: the disk refused; none of the batch may be considered written (targets
            renamed before the failure hold complete content, and temporaries left
            behind are what :func:`remove_temporaries` deletes).
    """
    temps = [(_write_temp(path, data, sync=False), path) for path, data in files]
    for temp, _ in temps:
        fsync_file(temp)
    for temp, path in temps:
        os.replace(temp, path)
    for directory in dict.fromkeys(path.parent for _, path in temps):
        fsync_dir(directory)


def remove_temporaries(root: Path) -> None:
    """Delete every temporary a crash left under ``root`` (its owner holds the lock)."""
    for temp in root.rglob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            temp.unlink()


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree if it exists (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
