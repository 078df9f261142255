"""``fedmq clear``: delete what a federation left retained on the broker.

A finished aggregator clears its own blobs and keeps only the small ``finished``
announcement; federations stopped before that (or from older fedmq versions) leave the
announcement, blob chunks and every status retained.  ``fedmq clear`` removes all of it
(:func:`fedmq.transport.clearing.clear_federation`, which ``fedmq simulate`` uses too):

1. **Scan**: subscribe to ``<root>/<federation>/#`` on a clean session and collect the
   retained messages until a marker published on ``<root>/<federation>/clear/<client id>``
   comes back (:func:`~fedmq.transport.retained.retained_snapshot`): MQTT has no "end of
   retained messages", the marker is the proof that nothing more is coming.
2. **Refuse** while the retained aggregator status says anything but ``offline``: a
   running aggregator would publish everything again (``--force`` clears anyway).
3. **Clear**: publish an empty retained message on every topic of the fedmq scheme
   found: the announcement, every blob chunk, the aggregator status, every agent status.
   Retained topics under the prefix that are not fedmq's are listed and left alone.
4. **Verify**: scan again.  What a broker dropped beyond its queue limits in the first
   scan shows up now and is cleared too, until a scan finds nothing.  What comes back
   after being cleared means someone republished it (a running aggregator, a broker ACL
   refusing our empty messages): reported, and the exit code says so.  Agents still
   running publish their status again at every heartbeat: that is only a warning.

The identity needs read and write access to ``<root>/<federation>/#`` (broker ACL).

Exit codes: 0 cleared (or nothing to clear), 2 bad command line, 70 something could
not be cleared or the broker was unreachable, 75 refused (the aggregator is running),
78 bad broker/TLS settings.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

import typer
from pydantic import ValidationError

from fedmq import exit_codes
from fedmq.cli.broker_options import (
    CaFileOption,
    CertFileOption,
    ClientIdOption,
    KeyFileOption,
    PasswordOption,
    UsernameOption,
)
from fedmq.config_file import describe
from fedmq.errors import ConfigError, InvalidIdentifierError, TransportError
from fedmq.transport.broker_config import BrokerSection
from fedmq.transport.clearing import (
    ClearRefusedError,
    ClearReport,
    Retained,
    clear_federation,
    shown_names,
)
from fedmq.transport.retained import SCAN_TIMEOUT
from fedmq.wire.ids import validate_id
from fedmq.wire.topics import DEFAULT_ROOT, Topics

# Retained is re-exported: tests sort scans with it.
__all__ = ["ClearRefusedError", "ClearReport", "Retained", "clear_command", "clear_federation"]


# ---------------------------------------------------------------------------- command


def _fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"fedmq: {message}", err=True)
    return typer.Exit(code)


def clear_command(
    broker: Annotated[
        str, typer.Option("--broker", "-b", help="mqtt://host[:port] or mqtts://host[:port]")
    ],
    federation: Annotated[str, typer.Option("--federation", "-f", help="federation id")],
    root: Annotated[str, typer.Option("--root", help="topic root")] = DEFAULT_ROOT,
    force: Annotated[
        bool, typer.Option("--force", help="clear even while the aggregator looks alive")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what is retained")] = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    username: UsernameOption = None,
    password: PasswordOption = None,
    protocol: Annotated[str, typer.Option("--protocol", help="MQTT version: 5 or 3.1.1")] = "5",
    client_id: ClientIdOption = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="seconds per broker operation")
    ] = SCAN_TIMEOUT,
) -> None:
    """Delete a federation's retained messages: announcement, blobs and statuses."""
    identity = client_id or f"fedmq-clear-{secrets.token_hex(4)}"
    try:
        topics = Topics(federation, root)
        validate_id(identity, "client id")
    except InvalidIdentifierError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        section = BrokerSection(
            url=broker,
            username=username,
            password=password,  # pydantic makes it a SecretStr
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            protocol=protocol,  # validated: "5" or "3.1.1"
        )
    except ValidationError as exc:
        raise _fail(exit_codes.CONFIG_ERROR, f"invalid broker settings:\n{describe(exc)}") from None
    settings = section.session_settings(identity)
    try:
        report = asyncio.run(
            clear_federation(settings, topics, force=force, dry_run=dry_run, timeout=timeout)
        )
    except ClearRefusedError as exc:
        raise _fail(exit_codes.BUSY, f"{exc}; stop it first, or pass --force") from None
    except ConfigError as exc:
        raise _fail(exit_codes.CONFIG_ERROR, str(exc)) from None
    except TransportError as exc:
        raise _fail(exit_codes.RUNTIME_FAILURE, str(exc)) from None
    _print(report, topics, dry_run)
    if report.came_back:
        raise _fail(
            exit_codes.RUNTIME_FAILURE,
            f"{len(report.came_back)} topics were retained again after clearing "
            f"({shown_names(report.came_back)}): a client republishes them, or the broker "
            "refused our empty messages (ACL)",
        )


def _print(report: ClearReport, topics: Topics, dry_run: bool) -> None:
    found = report.found
    lines = found.describe("retained:" if dry_run else "cleared")
    if not lines:
        typer.echo(f"nothing retained under {topics.prefix}/")
    for line in lines:
        typer.echo(line)
    extra = len(report.cleared) - len(found.clearable())
    if extra > 0:
        typer.echo(f"cleared {extra} more topics a later scan found (broker queue limits)")
    for topic in found.foreign:
        typer.echo(f"left alone: {topic} (not a fedmq topic)")
    if report.live_agents:
        typer.echo(
            f"warning: {len(report.live_agents)} agents are still running and publish their "
            f"status again: {shown_names(report.live_agents)}",
            err=True,
        )
