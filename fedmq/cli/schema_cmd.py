"""``fedmq schema [TYPE]``: the JSON Schemas of the control messages.

The messages on the human-readable topics (``round``, ``ack/<client>`` (acks and
resend requests), ``status/<client>``, ``aggregator/status``) are pydantic models in
:mod:`fedmq.wire.control`; this prints their JSON Schemas (draft 2020-12, as pydantic
writes them), all of them keyed by message type, or the one of ``TYPE``: a message type
(``round``, ``ack``, ``resend``, ``agent_status``, ``aggregator_status``), its dashed
form (``agent-status``) or ``announcement``.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fedmq.wire.control import control_schemas

ALIASES = {"announcement": "round", "round_announcement": "round"}


def schema_command(
    message_type: Annotated[
        str | None,
        typer.Argument(
            metavar="TYPE",
            help="round, ack, resend, agent_status or aggregator_status (default: all)",
        ),
    ] = None,
) -> None:
    """Print the JSON Schemas of the control messages (announcement, ack, statuses)."""
    schemas = control_schemas()
    if message_type is None:
        typer.echo(json.dumps(schemas, indent=2, sort_keys=True))
        return
    name = message_type.strip().lower().replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in schemas:
        raise typer.BadParameter(
            f"{message_type!r} is not a control message; choose from {', '.join(schemas)}",
            param_hint="TYPE",
        )
    typer.echo(json.dumps(schemas[name], indent=2, sort_keys=True))
