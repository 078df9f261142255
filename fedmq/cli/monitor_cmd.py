"""``fedmq monitor``: a live view of a federation from its control topics (read-only).

Connects to the broker (TLS and the read-only monitor identity of ``fedmq pki monitor``
supported), subscribes to ``round``, ``status/+`` and ``aggregator/status`` of one
federation and never to blobs, updates or acks, and draws the round, its deadline,
every agent, the rejections and the trend of the rounds it saw
(:mod:`fedmq.monitor`).  ``--once`` prints one snapshot after the retained messages
arrived (``--json``: the snapshot as JSON, for scripts) and exits.

Exit codes: 0 done, 2 bad command line, 70 broker unreachable or (``--once``) the
retained round and aggregator status did not arrive within ``--timeout`` (the snapshot
is printed anyway, with ``"complete": false``), 78 bad broker, TLS or key settings.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

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
from fedmq.monitor.config import MonitorFile, broker_table, validate_file
from fedmq.monitor.live import REFRESH_S, SETTLE_S, TIMEOUT_S, collect, watch
from fedmq.monitor.state import MonitorState
from fedmq.monitor.view import render
from fedmq.transport.broker_config import BrokerSection
from fedmq.wire.ids import validate_id, validate_root
from fedmq.wire.signing import TrustedKeys, read_verify_key
from fedmq.wire.topics import DEFAULT_ROOT


def _fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"fedmq: {message}", err=True)
    return typer.Exit(code)


def _broker(
    config: Path | None, options: dict[str, Any]
) -> tuple[BrokerSection, MonitorFile | None]:
    """The broker settings: the file's ``[broker]``, overridden by the options given."""
    given = {key: value for key, value in options.items() if value is not None}
    if config is None:
        if "url" not in given:
            raise typer.BadParameter("give --broker URL, or --config FILE (monitor.toml)")
        try:
            return BrokerSection(**given), None
        except ValidationError as exc:
            raise ConfigError(f"invalid broker settings:\n{describe(exc)}") from None
    top, broker = broker_table(config)
    parsed = validate_file(config, top, {**broker, **given})
    return parsed.broker, parsed


def monitor_command(
    broker: Annotated[
        str | None,
        typer.Option("--broker", "-b", help="mqtt://host[:port] or mqtts://host[:port]"),
    ] = None,
    federation: Annotated[
        str | None, typer.Option("--federation", "-f", help="federation id")
    ] = None,
    root: Annotated[
        str | None, typer.Option("--root", help=f"topic root (default {DEFAULT_ROOT})")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="monitor.toml: \\[broker] table, federation, topic_root, aggregator_keys",
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="print one snapshot once the retained state arrived")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="with --once: the snapshot as JSON")
    ] = False,
    aggregator_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--aggregator-key",
            help="the aggregator's public key (aggregator.pub): verify its signatures",
        ),
    ] = None,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    username: UsernameOption = None,
    password: PasswordOption = None,
    protocol: Annotated[
        str | None, typer.Option("--protocol", help="MQTT version: 5 or 3.1.1")
    ] = None,
    client_id: ClientIdOption = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.1, help="--once: seconds to wait for the retained state"),
    ] = TIMEOUT_S,
    settle: Annotated[
        float,
        typer.Option(
            "--settle", min=0.0, help="--once: seconds without a retained message = all arrived"
        ),
    ] = SETTLE_S,
    refresh: Annotated[
        float, typer.Option("--refresh", min=0.05, help="seconds between redraws")
    ] = REFRESH_S,
) -> None:
    """Watch a federation live: round, deadline, agents, rejections, trend (read-only)."""
    if as_json and not once:
        raise typer.BadParameter("--json needs --once (the live view is for terminals)")
    identity = client_id or f"fedmq-monitor-{secrets.token_hex(4)}"
    options = {
        "url": broker,
        "username": username,
        "password": password,
        "ca_file": ca_file,
        "cert_file": cert_file,
        "key_file": key_file,
        "protocol": protocol,
    }
    try:
        section, file = _broker(config, options)
        federation = federation or (file.federation if file else None)
        if federation is None:
            raise typer.BadParameter("give --federation (or federation in the --config file)")
        root = root or (file.topic_root if file else None) or DEFAULT_ROOT
        validate_id(federation, "federation id")
        validate_root(root)
        validate_id(identity, "client id")
        key_files = list(aggregator_key or []) or (list(file.aggregator_keys) if file else [])
        trusted = TrustedKeys(read_verify_key(p) for p in key_files) if key_files else None
    except InvalidIdentifierError as exc:
        raise typer.BadParameter(str(exc)) from None
    except ConfigError as exc:
        raise _fail(exit_codes.CONFIG_ERROR, str(exc)) from None
    settings = section.session_settings(identity)
    state = MonitorState(federation, root, trusted=trusted)
    try:
        if once:
            complete = asyncio.run(collect(settings, state, settle_s=settle, timeout=timeout))
            _print_once(state, as_json)
            if not complete:
                raise _fail(
                    exit_codes.RUNTIME_FAILURE,
                    f"the retained round and aggregator status of {state.topics.prefix} did "
                    f"not arrive within {timeout:g} s (not started, cleared, or another "
                    "--root?)",
                )
            return
        asyncio.run(watch(settings, state, Console(), refresh_s=refresh))
    except KeyboardInterrupt:
        raise typer.Exit(exit_codes.OK) from None
    except ConfigError as exc:
        raise _fail(exit_codes.CONFIG_ERROR, str(exc)) from None
    except TransportError as exc:
        raise _fail(exit_codes.RUNTIME_FAILURE, str(exc)) from None


def _print_once(state: MonitorState, as_json: bool) -> None:
    snapshot = state.snapshot(time.time())
    if as_json:
        sys.stdout.write(json.dumps(snapshot, indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()
    else:
        Console().print(render(snapshot))
