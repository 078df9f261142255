"""``fedmq report STATE_DIR``: an HTML page and PNG plots of a federation (``fedmq.report``).

It reads the aggregator's state directory without locking or changing it, so it works
on a finished federation and beside a running ``fedmq serve`` alike.  The plots need
matplotlib (the ``simulate`` extra); without it the command says so and exits 78.

Exit codes: 0 written, 2 bad command line, 74 not a readable state directory,
78 matplotlib missing or ``--out`` unusable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmq import exit_codes
from fedmq.errors import ConfigError, StateError

PLOTS_EXTRA = "pip install 'fedmq[simulate]'"


def report_command(
    state_dir: Annotated[
        Path,
        typer.Argument(help="the aggregator's state_dir (federation.toml)", show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="directory to write (default: report-<federation>)"),
    ] = None,
) -> None:
    """Write an HTML report (accuracy, loss, participation, bytes, durations) of a federation."""
    try:
        from fedmq.report.build import write_report  # noqa: PLC0415 - matplotlib is optional
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "matplotlib":
            raise
        typer.echo(
            f"fedmq: fedmq report draws its plots with matplotlib, which is missing: {PLOTS_EXTRA}",
            err=True,
        )
        raise typer.Exit(exit_codes.CONFIG_ERROR) from None
    from fedmq.report.history import read_history  # noqa: PLC0415 - with write_report

    try:
        if out is None:
            federation = read_history(state_dir).federation or state_dir.resolve().name
            out = Path(f"report-{federation}")
        report = write_report(state_dir, out)
    except StateError as exc:
        typer.echo(f"fedmq: {exc}", err=True)
        raise typer.Exit(exit_codes.STATE_FAILURE) from None
    except ConfigError as exc:
        typer.echo(f"fedmq: {exc}", err=True)
        raise typer.Exit(exit_codes.CONFIG_ERROR) from None
    history = report.history
    for problem in history.problems:
        typer.echo(f"fedmq: skipped {problem}", err=True)
    typer.echo(
        f"{history.federation or state_dir}: {len(history.rounds)} rounds, {history.status}; "
        f"wrote {report.page}"
    )
