"""The aggregator's state directory: every durable byte, written atomically and fsync'd.

::

    <state_dir>/
      LOCK                                   flock'd while a service owns the directory
      state.json                             coordinator snapshot (the commit point)
      origin.json                            where the round-0 model came from (``initial``)
      checkpoints/<round>.params             global model after <round> (0: initial)
      checkpoints/<round>.optimizer          server optimizer state with it (both pruned
                                             by the [retention] policy)
      rounds/<round>/updates/<seq>@<client>@<update id>.update
                                             accepted update envelopes, as received
      rounds/<round>/record.json             how the round went (metrics, contributors)
      rounds/<round>/stats.json              what the service measured of it (bytes,
                                             agents that never answered); informational

Every file is written through :mod:`fedmq.durable_files` (a temporary name in its final
directory, fsync'd, renamed over its final name, the directory fsync'd): after a crash a
file is either complete or absent.  Updates are written in batches that share their
fsyncs (:func:`~fedmq.durable_files.write_files`) because those dominate ingest time.

Checkpoints follow a retention policy (:mod:`~fedmq.aggregator.retention`): after each
checkpoint write, and after each snapshot that commits a newer checkpoint, the ones the
policy no longer keeps are deleted.  The checkpoint the committed snapshot names is
never among them, nor the one just written: a crash at any point restarts from a
checkpoint that exists.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.aggregator.retention import CheckpointRetention
from fedmq.buffers import Buffer
from fedmq.coordinator.actions import Ticket
from fedmq.coordinator.records import RoundRecord
from fedmq.durable_files import (
    lock_directory,
    remove_temporaries,
    remove_tree,
    write_file,
    write_files,
)
from fedmq.errors import StateError

STATE_FILE = "state.json"
ORIGIN_FILE = "origin.json"
ROUND_STATS_FILE = "stats.json"
_ROUND_DIGITS = 6
_UPDATE_NAME = re.compile(
    r"(?P<seq>\d+)@(?P<client>[A-Za-z0-9._-]+)@(?P<uid>[A-Za-z0-9._-]+)\.update"
)


def atomic_write(path: Path, data: Buffer) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data)


def _round_name(round_id: int) -> str:
    return f"{round_id:0{_ROUND_DIGITS}d}"


def checkpoint_file(state_dir: Path, round_id: int, kind: str = "params") -> Path:
    """Path of a checkpoint file (``params`` or ``optimizer``) in ``state_dir``."""
    return state_dir / "checkpoints" / f"{_round_name(round_id)}.{kind}"


def checkpoint_rounds(state_dir: Path) -> list[int]:
    """Rounds with a stored global model in ``state_dir`` (0: the initial one), ascending.

    Reads without the lock, so it works beside a running service.
    """
    directory = state_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(path.stem) for path in directory.glob("*.params") if path.stem.isdigit())


@dataclass(frozen=True)
class StoredUpdate:
    """An update file of the open round."""

    seq: int
    client: str
    update_id: str
    path: Path


class StateStore:
    """Owns one state directory (exclusively: a second service on it fails to open).

    Args:
        root: the state directory (created if missing).
        retention: which checkpoints to keep (default: the ``[retention]`` defaults).

    Raises:
        StateError: the directory cannot be created, or another process holds it.
    """

    def __init__(self, root: Path, retention: CheckpointRetention | None = None) -> None:
        self.root = root
        self.retention = CheckpointRetention() if retention is None else retention
        # The checkpoint the snapshot on disk names: what a restart would load.
        self._committed: int | None = None
        try:
            self._lock_fd = lock_directory(root)
        except BlockingIOError:
            raise StateError(
                f"state directory {root} is in use by another aggregator (stop it first)"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot use state directory {root}: {exc}") from exc
        remove_temporaries(root)

    def close(self) -> None:
        """Release the directory."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paths

    def round_dir(self, round_id: int) -> Path:
        """Directory of one round's files."""
        return self.root / "rounds" / _round_name(round_id)

    def updates_dir(self, round_id: int) -> Path:
        """Directory of the updates accepted into ``round_id``."""
        return self.round_dir(round_id) / "updates"

    def checkpoint_path(self, round_id: int, kind: str = "params") -> Path:
        """Path of a checkpoint file (``params`` or ``optimizer``)."""
        return checkpoint_file(self.root, round_id, kind)

    # ------------------------------------------------------------------ snapshot

    def load_snapshot(self) -> dict[str, Any] | None:
        """The last saved snapshot, or None for a new state directory.

        Raises:
            StateError: the file exists but is not a JSON object.
        """
        path = self.root / STATE_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise StateError(f"{path} does not hold a JSON object")
        self._committed = _checkpoint_of(data)
        return data

    def save_snapshot(self, snapshot: dict[str, Any]) -> None:
        """Atomically replace the snapshot (then prune checkpoints it made unneeded)."""
        atomic_write(self.root / STATE_FILE, json.dumps(snapshot, sort_keys=True).encode())
        committed = _checkpoint_of(snapshot)
        if committed != self._committed:
            self._committed = committed
            self.prune_checkpoints()

    def save_origin(self, origin: dict[str, Any]) -> None:
        """Record where a new federation's round-0 model came from (``initial``)."""
        atomic_write(self.root / ORIGIN_FILE, json.dumps(origin, sort_keys=True).encode())

    def load_origin(self) -> dict[str, Any] | None:
        """The :meth:`save_origin` record (None: absent or unreadable; it is informational)."""
        try:
            data = json.loads((self.root / ORIGIN_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, round_id: int, params: bytes, optimizer: bytes) -> None:
        """Store the global model after ``round_id`` and the optimizer state with it.

        Then prune the checkpoints the retention policy no longer keeps.
        """
        atomic_write(self.checkpoint_path(round_id, "optimizer"), optimizer)
        atomic_write(self.checkpoint_path(round_id, "params"), params)
        self.prune_checkpoints(round_id)

    def prune_checkpoints(self, written: int | None = None) -> list[int]:
        """Delete the checkpoints the retention policy does not keep; return their rounds.

        Never deletes the checkpoint the committed snapshot names, nor ``written`` (the
        one just stored, which the next snapshot will name).
        """
        if self.retention.keeps_everything:
            return []
        protect = {r for r in (self._committed, written) if r is not None}
        pruned = self.retention.prunable(self.checkpoints(), protect)
        for round_id in pruned:
            # params first: checkpoint_rounds() lists .params files, so a crash between
            # the two unlinks leaves an orphaned .optimizer, never a half checkpoint.
            self.checkpoint_path(round_id, "params").unlink(missing_ok=True)
            self.checkpoint_path(round_id, "optimizer").unlink(missing_ok=True)
        for orphan in (self.root / "checkpoints").glob("*.optimizer"):
            stem = orphan.stem
            if (
                stem.isdigit()
                and int(stem) not in protect
                and not orphan.with_suffix(".params").exists()
            ):
                orphan.unlink(missing_ok=True)  # what such a crash left behind
        return pruned

    def load_checkpoint(self, round_id: int) -> tuple[bytes, bytes]:
        """``(params, optimizer)`` blobs of a checkpoint.

        Raises:
            StateError: the checkpoint is missing or unreadable.
        """
        try:
            return (
                self.checkpoint_path(round_id, "params").read_bytes(),
                self.checkpoint_path(round_id, "optimizer").read_bytes(),
            )
        except OSError as exc:
            raise StateError(f"checkpoint of round {round_id} is unreadable: {exc}") from exc

    def checkpoints(self) -> list[int]:
        """Rounds with a stored global model, ascending."""
        return checkpoint_rounds(self.root)

    # ------------------------------------------------------------------ updates

    @staticmethod
    def update_file_name(ticket: Ticket) -> str:
        """``<seq>@<client>@<update id>.update`` ('@' cannot occur in ids)."""
        return f"{ticket.seq:010d}@{ticket.key.client}@{ticket.key.update_id}.update"

    def persist_updates(self, tickets: Sequence[Ticket]) -> None:
        """Durably store accepted updates as one batch (one fsync pass, then the renames).

        Raises:
            OSError: the disk refused; none of the batch may be considered stored.
        """
        files: list[tuple[Path, Buffer]] = []
        for ticket in tickets:
            directory = self.updates_dir(ticket.fold_round)
            directory.mkdir(parents=True, exist_ok=True)
            files.append((directory / self.update_file_name(ticket), ticket.update.data))
        write_files(files)

    def stored_updates(self, round_id: int) -> list[StoredUpdate]:
        """Updates stored for ``round_id``, in acceptance order."""
        directory = self.updates_dir(round_id)
        if not directory.is_dir():
            return []
        found = []
        for path in directory.iterdir():
            match = _UPDATE_NAME.fullmatch(path.name)
            if match is None:
                continue
            found.append(StoredUpdate(int(match["seq"]), match["client"], match["uid"], path))
        return sorted(found, key=lambda item: item.seq)

    def prune_updates(self, before: int) -> None:
        """Delete the stored updates of every round before ``before`` (records stay)."""
        rounds = self.root / "rounds"
        if not rounds.is_dir():
            return
        for directory in rounds.iterdir():
            if directory.name.isdigit() and int(directory.name) < before:
                remove_tree(directory / "updates")

    # ------------------------------------------------------------------ records

    def save_record(self, record: RoundRecord) -> None:
        """Store the record of a finished round."""
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        atomic_write(self.round_dir(record.round) / "record.json", data)

    def records(self) -> Iterator[RoundRecord]:
        """Every stored round record, in round order."""
        yield from read_records(self.root)

    def save_round_stats(self, round_id: int, stats: dict[str, Any]) -> None:
        """Store what the service measured of an ended round (``fedmq report`` shows it).

        Atomic but not fsync'd: nothing depends on it after a crash.
        """
        path = self.round_dir(round_id) / ROUND_STATS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps(stats, sort_keys=True).encode(), durable=False)


def _checkpoint_of(snapshot: dict[str, Any]) -> int | None:
    checkpoint = snapshot.get("checkpoint")
    return checkpoint if isinstance(checkpoint, int) else None


def read_records(
    state_dir: Path, on_error: Callable[[Path, StateError], None] | None = None
) -> Iterator[RoundRecord]:
    """Round records of a state directory, in round order (no lock: read-only).

    Args:
        state_dir: the state directory (may belong to a running service).
        on_error: called with a record that cannot be read, which is then skipped
            (None: raise).

    Raises:
        StateError: a record file is not a valid round record (without ``on_error``).
    """
    rounds = state_dir / "rounds"
    if not rounds.is_dir():
        return
    for directory in sorted(d for d in rounds.iterdir() if d.name.isdigit()):
        path = directory / "record.json"
        if not path.is_file():
            continue
        try:
            record = RoundRecord.from_json(json.loads(path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            error = StateError(f"{path} is not a valid round record: {exc}")
            if on_error is None:
                raise error from exc
            on_error(path, error)
            continue
        yield record


def read_round_stats(state_dir: Path) -> dict[int, dict[str, Any]]:
    """The ``stats.json`` of every round that has one, by round (no lock: read-only).

    A missing, unreadable or malformed file is skipped: the stats are informational.
    """
    rounds = state_dir / "rounds"
    if not rounds.is_dir():
        return {}
    found: dict[int, dict[str, Any]] = {}
    for directory in sorted(d for d in rounds.iterdir() if d.name.isdigit()):
        try:
            data = json.loads((directory / ROUND_STATS_FILE).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found[int(directory.name)] = data
    return found
