"""The device registry: which devices may send updates, and the key each one signs with.

A directory of ``<client id>.pub`` files, one Ed25519 public key each (``fedmq pki
device`` writes them; ``fedmq pki revoke`` deletes them).  The service re-reads it when
the directory changes, so enrolling or revoking a device needs no restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.wire.ids import id_problem
from fedmq.wire.signing import VerifyKey, read_verify_key

log = logging.getLogger(__name__)

SUFFIX = ".pub"
REFRESH_INTERVAL = 5.0  # seconds between checks of the registry directory


class DeviceRegistry:
    """The registry directory and what was last read from it.

    Args:
        directory: the registry directory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: tuple[int, int] | None = None
        self.keys: dict[str, VerifyKey] = {}

    def _current_stamp(self) -> tuple[int, int]:
        try:
            info = self.directory.stat()
        except OSError as exc:
            raise ConfigError(
                f"device registry {str(self.directory)!r} is unreadable: {exc}"
            ) from exc
        if not self.directory.is_dir():
            raise ConfigError(f"device registry {str(self.directory)!r} is not a directory")
        return info.st_mtime_ns, info.st_ino

    def load(self) -> dict[str, VerifyKey]:
        """Read every key (at start: any invalid file is a configuration error).

        Raises:
            ConfigError: the directory is missing, or a key file is invalid or misnamed.
        """
        self._stamp = self._current_stamp()
        self.keys = self._read(strict=True)
        return dict(self.keys)

    def refresh(self) -> dict[str, VerifyKey] | None:
        """Re-read the registry if the directory changed; None when it did not.

        Invalid files are logged and skipped (a half-copied key must not stop a running
        federation); a device whose file disappeared is no longer registered.
        """
        try:
            stamp = self._current_stamp()
        except ConfigError as exc:
            log.error("%s; keeping the %d devices registered before", exc, len(self.keys))
            return None
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        keys = self._read(strict=False)
        added = sorted(set(keys) - set(self.keys))
        removed = sorted(set(self.keys) - set(keys))
        if added or removed or keys != self.keys:
            log.info(
                "device registry changed: %d devices (added %s, removed %s)",
                len(keys),
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
            )
        self.keys = keys
        return dict(keys)

    def _read(self, *, strict: bool) -> dict[str, VerifyKey]:
        keys: dict[str, VerifyKey] = {}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            client = path.name[: -len(SUFFIX)]
            try:
                problem = id_problem(client)
                if problem is not None:
                    raise ConfigError(f"{path.name}: client id {client!r} {problem}")
                keys[client] = read_verify_key(path)
            except ConfigError as exc:
                if strict:
                    raise ConfigError(f"device registry: {exc}") from exc
                log.warning("device registry: skipping %s: %s", path.name, exc)
        return keys
