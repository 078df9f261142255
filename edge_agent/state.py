"""The agent's state directory: layout, exclusive lock, small persistent state, residuals.

::

    <state_dir>/LOCK              held (flock) while an agent runs on this directory
    <state_dir>/state.json        last answered round, current bundle
    <state_dir>/cache/            content-addressed blobs (edge_agent.blob_cache)
    <state_dir>/outbox/           unacknowledged updates (edge_agent.outbox)
    <state_dir>/residual/         error-feedback residual per bundle: <bundle_sha256>.tensors
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_agent.outbox import Outbox, OutboxEntry, Residual
from fedmq.buffers import Buffer
from fedmq.durable_files import fsync_dir, lock_directory, write_file
from fedmq.errors import ConfigError, DecodeError
from fedmq.wire.control import RoundNumber
from fedmq.wire.tensor_codecs import RAW
from fedmq.wire.tensors import NO_COMPRESSION, decode_tensors, encode_tensors

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CACHE_DIR = "cache"  # the blob cache (edge_agent.blob_cache)
_RESIDUAL_SUFFIX = ".tensors"


class PersistentState(BaseModel):
    """What survives a restart besides blobs, outbox and residuals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str
    last_answered_round: RoundNumber | None = None
    bundle: str | None = None
    # issued_at of the newest signed announcement: an older one is a replay, also after
    # a restart (the broker may hold an old retained one).
    newest_announcement: float | None = None


class ResidualStore:
    """Error-feedback residuals, one file per model bundle.

    A residual only makes sense for the model whose deltas produced it, so it is keyed by
    the bundle's sha256, and residuals of other bundles are deleted when a new one is
    saved.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, bundle: str) -> Path:
        """File of the residual for ``bundle``."""
        return self.root / f"{bundle}{_RESIDUAL_SUFFIX}"

    def load(
        self, bundle: str, expected: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]
    ) -> dict[str, npt.NDArray[Any]]:
        """The residual for ``bundle``, restricted to ``expected`` names, shapes and dtypes.

        A missing, unreadable or mismatched residual yields ``{}`` (start from zero):
        error feedback is an optimisation, never worth failing a round for.
        """
        path = self.path(bundle)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            tensors = decode_tensors(data)
        except DecodeError as exc:
            log.warning("residual %s is unreadable (%s); starting from zero", path.name, exc)
            return {}
        residual: dict[str, npt.NDArray[Any]] = {}
        for name, array in tensors.items():
            want = expected.get(name)
            if want is None or array.shape != want[0] or array.dtype != want[1]:
                log.warning("residual tensor %r does not fit the model; dropping it", name)
                continue
            residual[name] = np.array(array)  # writable copy
        return residual

    def promote(self, residual: Residual) -> None:
        """Make a committed update's residual the current one for its bundle."""
        target = self.path(residual.bundle)
        os.replace(residual.path, target)
        fsync_dir(self.root)
        fsync_dir(residual.path.parent)
        self._drop_others(residual.bundle)

    def _drop_others(self, bundle: str) -> None:
        for path in self.root.iterdir():
            if path.name != f"{bundle}{_RESIDUAL_SUFFIX}":
                path.unlink(missing_ok=True)


def encode_residual(residual: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """Serialise a residual for :meth:`Outbox.commit`."""
    return encode_tensors(residual, RAW, compression=NO_COMPRESSION).data


class StateDir:
    """Opens a state directory for one agent: lock, layout and crash recovery.

    Raises:
        ConfigError: the directory cannot be created or written, or another agent holds
            its lock.
    """

    def __init__(self, root: Path, federation: str) -> None:
        self.root = root
        self.federation = federation
        try:
            self._lock_fd = lock_directory(root)
        except BlockingIOError:
            raise ConfigError(
                f"another fedmq-agent is running on state directory {str(root)!r}"
            ) from None
        except OSError as exc:
            raise ConfigError(f"state directory {str(root)!r} is not usable: {exc}") from exc
        try:
            self.outbox = Outbox(root / "outbox")
            self.residuals = ResidualStore(root / "residual")
            self.cache_dir = root / CACHE_DIR
            self.state = self._load_state()
        except OSError as exc:
            self.close()
            raise ConfigError(f"state directory {str(root)!r} is not usable: {exc}") from exc

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _load_state(self) -> PersistentState:
        path = self.root / STATE_FILE
        try:
            state = PersistentState.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return PersistentState(federation=self.federation)
        except ValidationError as exc:
            log.error("%s is unreadable (%s); starting with empty state", path, exc)
            return PersistentState(federation=self.federation)
        if state.federation != self.federation:
            log.warning(
                "state directory was used for federation %r; starting fresh for %r",
                state.federation,
                self.federation,
            )
            return PersistentState(federation=self.federation)
        return state

    def save_state(self, state: PersistentState) -> None:
        """Persist ``state`` atomically."""
        write_file(self.root / STATE_FILE, state.model_dump_json().encode())
        self.state = state

    def mark_answered(self, round_id: int, bundle: str) -> None:
        """Record that ``round_id`` has been answered (never lowers the mark)."""
        last = self.state.last_answered_round
        if last is not None and last >= round_id and self.state.bundle == bundle:
            return
        self.save_state(
            self.state.model_copy(
                update={
                    "last_answered_round": max(round_id, last if last is not None else round_id),
                    "bundle": bundle,
                }
            )
        )

    def note_announcement(self, issued_at: float) -> None:
        """Record the newest valid announcement's time (never lowers it)."""
        newest = self.state.newest_announcement
        if newest is not None and newest >= issued_at:
            return
        self.save_state(self.state.model_copy(update={"newest_announcement": issued_at}))

    def recover(self) -> None:
        """Finish what a crash interrupted: drop half-made commits, promote residuals.

        Also raises the answered-round mark to cover every committed update, in case the
        crash came between the outbox commit and the state write.
        """
        dropped = self.outbox.discard_staging()
        if dropped:
            log.info("discarded %d interrupted outbox commit(s)", dropped)
        pending = self.outbox.unpromoted_residuals()
        for residual in pending[:-1]:
            residual.path.unlink(missing_ok=True)  # superseded by a later round's
        if pending:
            self.residuals.promote(pending[-1])
        for entry in self.outbox.entries():
            if entry.federation == self.federation:
                self.mark_answered(entry.round, entry.bundle)

    def commit_update(
        self,
        entry: OutboxEntry,
        update: Buffer,
        residual: Mapping[str, npt.NDArray[Any]],
    ) -> None:
        """Commit an update to the outbox, then promote its residual and mark the round.

        ``residual`` is what this update's encoding lost (empty for a lossless codec: the
        update carried the older residual, which must not be added twice).  It travels
        inside the commit, so a crash cannot separate it from the update.
        """
        self.outbox.commit(entry, update, encode_residual(residual))
        promoted = self.outbox.unpromoted_residuals()
        if promoted:
            self.residuals.promote(promoted[-1])
        self.mark_answered(entry.round, entry.bundle)
