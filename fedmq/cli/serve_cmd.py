"""``fedmq serve`` (run a federation's aggregator) and ``fedmq export`` (a round's model).

Exit codes (:mod:`fedmq.exit_codes`): 0 stopped or finished, 78 configuration
error, 74 state directory unusable, 70 unexpected failure.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from fedmq import exit_codes
from fedmq.aggregator.config import load_settings
from fedmq.aggregator.export import export_onnx
from fedmq.aggregator.service import serve
from fedmq.errors import BundleError, ConfigError, StateError
from fedmq.log_format import LOG_FORMATS, LogFormat, configure_logging

log = logging.getLogger("fedmq.serve")

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="federation.toml (FEDMQ_* variables override it)"),
]


def _fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"fedmq: {message}", err=True)
    return typer.Exit(code)


def serve_command(
    config: ConfigOption = Path("federation.toml"),
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="serve Prometheus metrics on this port (overrides metrics_port)",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option("--log-format", help="text or json (overrides log_format)"),
    ] = None,
) -> None:
    """Run the aggregator of one federation until SIGTERM/SIGINT or its last round."""
    if log_format is not None and log_format not in LOG_FORMATS:
        raise _fail(exit_codes.USAGE, f"--log-format must be text or json, not {log_format!r}")
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise _fail(exit_codes.CONFIG_ERROR, str(exc)) from None
    # The command line wins over the file and the environment.
    flags = {"metrics_port": metrics_port, "log_format": log_format}
    settings = settings.model_copy(update={k: v for k, v in flags.items() if v is not None})
    chosen: LogFormat = settings.log_format
    configure_logging(settings.log_level, chosen, federation=settings.federation)
    try:
        asyncio.run(serve(settings))
    except (ConfigError, BundleError) as exc:
        raise _fail(exit_codes.CONFIG_ERROR, str(exc)) from None
    except StateError as exc:
        raise _fail(exit_codes.STATE_FAILURE, str(exc)) from None
    except Exception:
        log.exception("the aggregator failed")
        raise typer.Exit(exit_codes.RUNTIME_FAILURE) from None


def export_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write")],
    config: ConfigOption = Path("federation.toml"),
    round_id: Annotated[
        int | None, typer.Option("--round", "-r", help="round to export (default: latest)")
    ] = None,
) -> None:
    """Write the global model after a round as a standalone ONNX inference model."""
    try:
        settings = load_settings(config)
        exported = export_onnx(settings.state_dir, settings.bundle, out, round_id)
    except (ConfigError, BundleError) as exc:
        raise _fail(exit_codes.CONFIG_ERROR, str(exc)) from None
    except StateError as exc:
        raise _fail(exit_codes.STATE_FAILURE, str(exc)) from None
    typer.echo(f"wrote the model after round {exported} to {out}")
