"""Entry point of the ``fedmq`` command.

The commands (:mod:`fedmq.cli.commands`) need the server extra (typer, rich), which a
device install does not have: there ``fedmq`` says which extra to install and exits with
:data:`~fedmq.exit_codes.CONFIG_ERROR` instead of printing a traceback.  So this module
imports the commands only if their packages are there, and :func:`main` checks.
"""

from __future__ import annotations

import sys

from fedmq import exit_codes

SERVER_EXTRA = "pip install 'fedmq[server]'"
# Imported by the commands and installed by the server extra (click comes with typer,
# cryptography is `fedmq pki`'s).
SERVER_EXTRA_MODULES = frozenset({"typer", "click", "rich", "cryptography", "prometheus_client"})

_missing: str | None = None
try:
    from fedmq.cli.commands import app
except ModuleNotFoundError as exc:
    _missing = (exc.name or "").partition(".")[0]
    if _missing not in SERVER_EXTRA_MODULES:
        raise

__all__ = ["app", "main"]


def main() -> None:
    """Run the ``fedmq`` command line, or explain which extra it needs."""
    if _missing is not None:
        print(
            f"fedmq: the {_missing!r} package is missing: the fedmq command needs the "
            f"server extra ({SERVER_EXTRA}); devices run fedmq-agent",
            file=sys.stderr,
        )
        raise SystemExit(exit_codes.CONFIG_ERROR)
    app()
