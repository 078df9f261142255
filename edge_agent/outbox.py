"""The outbox: encoded updates on disk until the aggregator acknowledges them.

::

    outbox/<update_id>/update.bin        the update envelope, exactly as published
    outbox/<update_id>/entry.json        round, update id, blob reference, bundle
    outbox/<update_id>/residual.tensors  (until promoted) error-feedback residual
    outbox/.staging-<update_id>/          a commit in progress; deleted on recovery

:meth:`Outbox.commit` is the single durable step of a round: the update, the residual it
leaves behind and the fact that the round was answered land together with one directory
rename.  A crash before the rename leaves no trace (the round is trained again); after
it, recovery promotes the residual and the update is re-sent with the same update id.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmq.buffers import Buffer
from fedmq.durable_files import fsync_dir, remove_tree, write_file
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import RoundNumber
from fedmq.wire.ids import Identifier

log = logging.getLogger(__name__)

UPDATE_FILE = "update.bin"
ENTRY_FILE = "entry.json"
RESIDUAL_FILE = "residual.tensors"
_STAGING_PREFIX = ".staging-"


class OutboxEntry(BaseModel):
    """What the agent must remember about one unacknowledged update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    update_id: Identifier
    federation: Identifier
    client: Identifier
    round: RoundNumber
    created_at: float = Field(ge=0, allow_inf_nan=False)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    chunk_size: int = Field(ge=1)
    bundle: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the model bundle")
    deadline: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="the round's deadline: bounds re-send waits"
    )
    paced: bool = Field(
        False, description="the round paced uploads: send chunk 0, the rest when asked"
    )

    @property
    def ref(self) -> BlobRef:
        """Blob reference of the update envelope."""
        return BlobRef(self.sha256, self.size, self.chunk_size)


@dataclass(frozen=True)
class Residual:
    """An error-feedback residual file left by a committed update, waiting to be promoted."""

    bundle: str
    round: int
    path: Path


class Outbox:
    """Durable queue of updates awaiting their ack, one directory per update id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def commit(self, entry: OutboxEntry, update: Buffer, residual: Buffer | None) -> None:
        """Durably store an update (and the residual its encoding left) in one step.

        Raises:
            FileExistsError: an entry with this update id exists already.
            OSError: the disk refused (full, read-only): nothing was committed.
        """
        final = self.root / entry.update_id
        if final.exists():
            raise FileExistsError(f"outbox already holds update {entry.update_id}")
        staging = self.root / f"{_STAGING_PREFIX}{entry.update_id}"
        remove_tree(staging)
        staging.mkdir()
        try:
            write_file(staging / UPDATE_FILE, update)
            if residual is not None:
                write_file(staging / RESIDUAL_FILE, residual)
            write_file(staging / ENTRY_FILE, entry.model_dump_json().encode())
            os.rename(staging, final)
            fsync_dir(self.root)
        except BaseException:
            remove_tree(staging)
            raise

    def entries(self) -> list[OutboxEntry]:
        """Every committed entry, oldest first; unreadable ones are deleted with a log line."""
        found: list[OutboxEntry] = []
        for path in self.root.iterdir():
            if path.name.startswith(_STAGING_PREFIX) or not path.is_dir():
                continue
            entry = self._read_entry(path)
            if entry is not None:
                found.append(entry)
        found.sort(key=lambda entry: (entry.created_at, entry.update_id))
        return found

    def _read_entry(self, path: Path) -> OutboxEntry | None:
        try:
            entry = OutboxEntry.model_validate_json((path / ENTRY_FILE).read_bytes())
            update_size = (path / UPDATE_FILE).stat().st_size
        except (OSError, ValidationError) as exc:
            log.error("outbox entry %s is unreadable (%s); deleting it", path.name, exc)
            remove_tree(path)
            return None
        if entry.update_id != path.name or update_size != entry.size:
            log.error("outbox entry %s is inconsistent; deleting it", path.name)
            remove_tree(path)
            return None
        return entry

    def get(self, update_id: str) -> OutboxEntry | None:
        """The entry for ``update_id``, if present."""
        path = self.root / update_id
        if not path.is_dir() or update_id.startswith(_STAGING_PREFIX):
            return None
        return self._read_entry(path)

    def read_update(self, entry: OutboxEntry) -> bytes:
        """The update envelope of ``entry``, as committed."""
        return (self.root / entry.update_id / UPDATE_FILE).read_bytes()

    def remove(self, update_id: str) -> bool:
        """Delete an entry (acknowledged or dropped); False if it was not there."""
        path = self.root / update_id
        if update_id.startswith(_STAGING_PREFIX) or not path.is_dir():
            return False
        remove_tree(path)
        fsync_dir(self.root)
        return True

    def unpromoted_residuals(self) -> list[Residual]:
        """Residual files still inside committed entries, oldest round first."""
        found = []
        for entry in self.entries():
            path = self.root / entry.update_id / RESIDUAL_FILE
            if path.is_file():
                found.append(Residual(entry.bundle, entry.round, path))
        found.sort(key=lambda residual: residual.round)
        return found

    def discard_staging(self) -> int:
        """Delete commits interrupted by a crash; return how many there were."""
        stale = [p for p in self.root.iterdir() if p.name.startswith(_STAGING_PREFIX)]
        for path in stale:
            remove_tree(path)
        return len(stale)
