"""What ``fedmq pki`` refuses to do, and why.

Every error is a :class:`~fedmq.errors.ConfigError`: the command line maps it to exit
code 78 ("fix the input first"), and each message names the file, identity or option
to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedmq.errors import ConfigError


class PkiError(ConfigError):
    """A ``fedmq pki`` operation cannot be carried out as asked."""


class PkiNotFoundError(PkiError):
    """The PKI directory has no plant CA yet."""

    def __init__(self, root: Path) -> None:
        super().__init__(
            f"{root} holds no plant CA: run `fedmq pki init --plant NAME --dir {root}` first"
        )
        self.root = root


class ExistingFilesError(PkiError):
    """Files an operation would write exist already (and ``--force`` was not given)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        names = ", ".join(str(path) for path in paths)
        verb = "exists" if len(paths) == 1 else "exist"
        super().__init__(f"{names} already {verb}; pass --force to overwrite")
        self.paths = tuple(paths)


class InvalidNameError(PkiError):
    """A device id, client id, plant name or host name cannot be used."""


class IdentityConflictError(PkiError):
    """The name is already the certificate CN of another kind of identity.

    The CN is the broker username the ACL grants by, so one name must never be both a
    device and, say, the aggregator.
    """


class UnknownIdentityError(PkiError):
    """No valid certificate was issued to that name (nothing to revoke)."""


class CorruptPkiError(PkiError):
    """A file of the PKI directory is unreadable or was not written by ``fedmq pki``."""


class PkiBusyError(PkiError):
    """Another ``fedmq pki`` command is changing the same directory."""
