"""Writing the PKI's files: secrets 0600 from their first byte, nothing overwritten by accident.

An operation first plans every file it will write, checks that none exists (unless
forced) and only then writes them all, so a refused command leaves the directory as it
was.  Each file is written under a temporary name and renamed into place (via
:mod:`fedmq.durable_files`), so a crash never leaves half a key behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmq.durable_files import fsync_dir, lock_directory, temp_path
from fedmq.pki.errors import ExistingFilesError, PkiBusyError, PkiNotFoundError
from fedmq.pki.layout import PkiLayout

SECRET_MODE = 0o600  # private keys, signing keys, archives holding them
PUBLIC_MODE = 0o644  # certificates, public keys, CRL, ACL, configuration snippets
PRIVATE_DIR_MODE = 0o700  # directories holding a device's secrets before provisioning


@dataclass(frozen=True)
class PlannedFile:
    """One file an operation will write."""

    path: Path
    data: bytes
    secret: bool = False

    @property
    def mode(self) -> int:
        """Permission bits of the file."""
        return SECRET_MODE if self.secret else PUBLIC_MODE


def key_file_text(comment: str, line: str) -> bytes:
    """A key file: ``line`` under a ``#`` comment naming what the file is for."""
    # The key format ignores '#' lines: a comment tells an operator what a file is.
    return f"# {comment}\n{line}\n".encode("ascii")


def check_new(paths: Sequence[Path], *, force: bool) -> None:
    """Raise unless every path is free, or ``force`` allows replacing them.

    Raises:
        ExistingFilesError: naming every file that exists.
    """
    if force:
        return
    existing = [path for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise ExistingFilesError(existing)


def _write_one(planned: PlannedFile) -> None:
    temp = temp_path(planned.path)
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()  # a crash's leftover; O_EXCL below refuses to reuse it
    # Created with its final mode, so a private key is never readable by others, not
    # even between open() and a chmod.  The fchmod only undoes the umask (a 077 umask
    # would otherwise make certificates unreadable for the broker's user).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, planned.mode)
    try:
        os.fchmod(fd, planned.mode)
        view = memoryview(planned.data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, planned.path)


def write_planned(files: Sequence[PlannedFile], *, force: bool) -> None:
    """Write every planned file, after checking that none would be overwritten unforced.

    Parent directories are created as needed.

    Raises:
        ExistingFilesError: a target exists and ``force`` is false (nothing is written).
        OSError: the disk refused.
    """
    check_new([planned.path for planned in files], force=force)
    for planned in files:
        planned.path.parent.mkdir(parents=True, exist_ok=True)
        _write_one(planned)
    for directory in dict.fromkeys(planned.path.parent for planned in files):
        fsync_dir(directory)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with the directory itself closed to others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)  # an existing directory may have been made wider


def remove_file(path: Path) -> bool:
    """Delete ``path`` durably; True if it existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the PKI directory's lock: two commands must not both bump the index.

    Raises:
        PkiBusyError: another process holds it.
    """
    try:
        fd = lock_directory(root)
    except BlockingIOError:
        raise PkiBusyError(
            f"another fedmq pki command is changing {root}; wait for it to finish"
        ) from None
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_pki(layout: PkiLayout) -> Iterator[None]:
    """Hold the lock of a PKI directory that ``pki init`` made.

    Raises:
        PkiNotFoundError: it has no index (taking the lock would create the directory).
        PkiBusyError: another process holds it.
    """
    if not layout.index.is_file():
        raise PkiNotFoundError(layout.root)
    with locked(layout.root):
        yield
