"""Content-addressed blob cache in the state directory, with resumable downloads.

::

    blobs/<sha256>          complete blobs, verified when written and again when read
    partial/<sha256>/<i>    chunk i of a download in progress (one file per chunk)

One file per chunk makes resuming trivial and crash-safe: a chunk file is renamed into
place only once written, so after a restart every present file is a whole chunk (its
length is checked again), and the final sha256 check catches anything else.  Chunk files
are not fsync'd: a chunk lost to a power cut costs a re-download, not correctness.

**A full disk fails the download at once**, never at its timeout: before a download
starts, the free space (``os.statvfs``) must hold the missing chunks, the assembled
blob (written while the chunks still exist) and the reserve ``limits.min_free_mb``
leaves to the rest of the device; a write that still hits ``ENOSPC``/``EDQUOT`` raises
the same :class:`DiskFullError`, which the blob receiver turns into a failed fetch and
the round runner into a failed round ("disk full in …: need N MB, M MB free") that is
retried later.  Every file-system call the cache makes goes through one
:class:`CacheDisk`, so a test can make the disk full without root.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from fedmq.buffers import Buffer
from fedmq.durable_files import TMP_SUFFIX, remove_tree, temp_path, write_file
from fedmq.errors import IntegrityError, LimitExceededError
from fedmq.wire.blobs import BlobRef
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits

log = logging.getLogger(__name__)

_BLOBS = "blobs"
_PARTIAL = "partial"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def blob_dir(root: Path) -> Path:
    """Where the complete blobs of the cache at ``root`` live (read without opening it)."""
    return root / _BLOBS


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


class DiskFullError(OSError):
    """The cache's file system has no room for a download (or would dip into the reserve).

    An ``OSError`` with ``errno.ENOSPC``, so whatever handles a failed write handles it;
    its text names the directory, what was needed and what was free.
    """

    def __init__(self, directory: Path, need: int, free: int | None, reserve: int = 0) -> None:
        wanted = _mb(need) + (f" (+{_mb(reserve)} reserve, limits.min_free_mb)" if reserve else "")
        available = "unknown" if free is None else _mb(free)
        message = f"disk full in {directory}: need {wanted}, {available} free"
        super().__init__(errno.ENOSPC, message)
        self.directory = directory
        self.need = need
        self.free = free

    def __str__(self) -> str:
        return str(self.strerror)


class CacheDisk:
    """The file-system calls of the blob cache: writes and free space, in one place."""

    def write(self, path: Path, data: Buffer) -> None:
        """Write ``path`` atomically (not fsync'd: cached data is verified on read)."""
        try:
            write_file(path, data, durable=False)
        except OSError:
            temp_path(path).unlink(missing_ok=True)  # a partial temporary, e.g. on ENOSPC
            raise

    def free_bytes(self, directory: Path) -> int:
        """Bytes an unprivileged process may still write under ``directory``."""
        stat = os.statvfs(directory)
        return stat.f_bavail * stat.f_frsize


class DiskChunkStore:
    """The chunks of one blob on disk; resumes whatever an earlier process left.

    Implements :class:`fedmq.transport.blob_receiver.ChunkStore`.  On success :meth:`finish`
    moves the verified blob into the cache and deletes the chunk files.
    """

    def __init__(self, cache: BlobCache, ref: BlobRef, limits: DecodeLimits) -> None:
        ref.check_limits(limits)
        self._cache = cache
        self._ref = ref
        self._dir = cache.partial_dir(ref.sha256)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._have: set[int] = set()
        for path in self._dir.iterdir():
            index = _chunk_index(path, ref)
            if index is None or path.stat().st_size != ref.chunk_length(index):
                path.unlink(missing_ok=True)  # a stray temp file or a torn chunk
                continue
            self._have.add(index)
        if self._have:
            log.info(
                "resuming blob %s…: %d of %d chunks already on disk",
                ref.sha256[:12],
                len(self._have),
                ref.count,
            )
        # The chunks still to come, then the assembled blob beside them (finish()).
        cache.check_room(self._missing_bytes() + ref.size)

    @property
    def ref(self) -> BlobRef:
        """The blob being downloaded."""
        return self._ref

    @property
    def complete(self) -> bool:
        """True when every chunk is on disk."""
        return len(self._have) == self._ref.count

    @property
    def received(self) -> int:
        """Chunks on disk."""
        return len(self._have)

    def missing(self) -> list[int]:
        """Indices of chunks not on disk yet, ascending."""
        return [index for index in range(self._ref.count) if index not in self._have]

    def _missing_bytes(self) -> int:
        return sum(self._ref.chunk_length(index) for index in self.missing())

    def add(self, index: int, payload: Buffer) -> bool:
        """Write chunk ``index``; return False for a duplicate.

        Raises:
            MalformedMessageError: index out of range or wrong payload length.
            DiskFullError: no room for the chunk.
            OSError: the write failed otherwise.
        """
        view = self._ref.check_chunk(index, payload)
        if index in self._have:
            return False
        self._cache.write(self._dir / str(index), view, self._missing_bytes() + self._ref.size)
        self._have.add(index)
        return True

    def finish(self) -> bytearray:
        """Concatenate, verify and cache the blob; return its bytes.

        Raises:
            MalformedMessageError: chunks are missing.
            IntegrityError: the bytes do not hash to the blob's sha256; every chunk file
                is deleted so the blob is fetched again from scratch.
            DiskFullError: no room for the assembled blob (the chunks stay for a retry).
        """
        ref = self._ref
        ref.check_complete(len(self._have))
        data = bytearray(ref.size)
        for index in range(ref.count):
            span = ref.chunk_span(index)
            with open(self._dir / str(index), "rb") as handle:
                read = handle.readinto(memoryview(data)[span])
            if read != span.stop - span.start:  # the file changed under us: treat as corrupt
                self._reset()
                raise IntegrityError(f"chunk file {index} of {ref.sha256[:12]} is short")
        try:
            ref.verify(data)
        except IntegrityError:
            self._reset()
            raise
        self._cache.put_verified(ref, data)
        remove_tree(self._dir)
        return data

    def _reset(self) -> None:
        for index in self._have:
            (self._dir / str(index)).unlink(missing_ok=True)
        self._have.clear()


def _chunk_index(path: Path, ref: BlobRef) -> int | None:
    name = path.name
    if name.endswith(TMP_SUFFIX) or not name.isdigit() or (len(name) > 1 and name[0] == "0"):
        return None
    index = int(name)
    return index if index < ref.count else None


class BlobCache:
    """Verified blobs by sha256, plus the partial downloads of blobs not yet complete.

    Args:
        root: the cache directory (created if needed).
        max_bytes: complete blobs beyond this total are evicted, oldest first, except
            the ones a caller asks to keep.
        reserve_bytes: free space a download must leave on the file system.
        disk: the file-system calls (tests pass a disk that fills up).
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        reserve_bytes: int = 0,
        disk: CacheDisk | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        self.disk = CacheDisk() if disk is None else disk
        (root / _BLOBS).mkdir(parents=True, exist_ok=True)
        (root / _PARTIAL).mkdir(parents=True, exist_ok=True)
        self.corrupt_reads = 0

    def blob_path(self, sha256: str) -> Path:
        """Where the complete blob ``sha256`` lives."""
        return blob_dir(self.root) / sha256

    def partial_dir(self, sha256: str) -> Path:
        """Where the chunks of blob ``sha256`` gather while it downloads."""
        return self.root / _PARTIAL / sha256

    def get(self, ref: BlobRef, limits: DecodeLimits = DEFAULT_LIMITS) -> bytearray | None:
        """Return the cached blob if present and intact, else None.

        A cached file whose size or sha256 is wrong (disk corruption, tampering) is
        deleted and reported as missing, so the caller downloads it again.
        """
        path = self.blob_path(ref.sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        try:
            ref.check_limits(limits)
        except LimitExceededError:
            return None
        if size != ref.size:
            self._discard(path, f"is {size} bytes, expected {ref.size}")
            return None
        data = bytearray(size)
        with open(path, "rb") as handle:
            read = handle.readinto(data)
        try:
            ref.verify(memoryview(data)[:read])  # a short read cannot hash right either
        except IntegrityError:
            self._discard(path, "fails its sha256 check")
            return None
        os.utime(path)  # mark as recently used for eviction
        return data

    def _discard(self, path: Path, problem: str) -> None:
        self.corrupt_reads += 1
        log.warning(
            "cached blob %s… %s; deleting it and downloading again", path.name[:12], problem
        )
        path.unlink(missing_ok=True)

    def put_verified(self, ref: BlobRef, data: Buffer) -> None:
        """Store a blob whose sha256 the caller has checked.

        Raises:
            DiskFullError: no room for it.
        """
        self.write(self.blob_path(ref.sha256), data, ref.size)

    def check_room(self, need: int) -> None:
        """Fail now if ``need`` more bytes would not fit beside the reserve.

        Raises:
            DiskFullError: naming the directory, the bytes needed and the bytes free.
        """
        free = self.disk.free_bytes(self.root)
        if free - self.reserve_bytes < need:
            raise DiskFullError(self.root, need, free, self.reserve_bytes)

    def write(self, path: Path, data: Buffer, need: int) -> None:
        """Write a cache file; a full disk becomes :class:`DiskFullError`.

        Args:
            path: the file.
            data: its content.
            need: bytes the download still has to write (for the error message).
        """
        try:
            self.disk.write(path, data)
        except OSError as exc:
            if exc.errno not in _DISK_FULL or isinstance(exc, DiskFullError):
                raise
            try:
                free: int | None = self.disk.free_bytes(self.root)
            except OSError:
                free = None
            raise DiskFullError(self.root, need, free) from exc

    def store_factory(self, ref: BlobRef, limits: DecodeLimits) -> DiskChunkStore:
        """A :class:`DiskChunkStore` for ``ref`` (pass as ``BlobReceiver(store_factory=…)``)."""
        return DiskChunkStore(self, ref, limits)

    def evict(self, keep: set[str]) -> list[str]:
        """Delete the least recently used blobs beyond ``max_bytes``, never those in ``keep``.

        Partial downloads of blobs not in ``keep`` are deleted too: they belong to rounds
        that are over.

        Returns:
            sha256 of every blob deleted.
        """
        removed: list[str] = []
        for partial in (self.root / _PARTIAL).iterdir():
            if partial.name not in keep:
                remove_tree(partial)
        entries = []
        for path in (self.root / _BLOBS).iterdir():
            if path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)
                continue
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path.name in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path.name)
        return removed
