"""``fedmq new NAME``: scaffold a project that simulates and deploys unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmq import exit_codes
from fedmq.errors import ConfigError
from fedmq.scaffold import TEMPLATES, create_project


def new_command(
    name: Annotated[Path, typer.Argument(help="project directory; its name is the federation id")],
    template: Annotated[
        str, typer.Option(help=f"starting point: {', '.join(TEMPLATES)}")
    ] = "digits",
) -> None:
    """Create a federation project: model, data loader, federation.toml, agent.toml."""
    try:
        project = create_project(name, template)
    except ConfigError as exc:
        typer.echo(f"fedmq new: {exc}", err=True)
        raise typer.Exit(exit_codes.USAGE) from None
    where = str(name)
    typer.echo(f"created {where}/ ({project.template} template, federation {project.name!r}):")
    for path in project.files:
        if path.parent == project.directory:
            typer.echo(f"  {path.relative_to(project.directory)}")
    typer.echo(f"  bundle/ (the compiled model)\n\nnext: see {where}/README.md, or")
    typer.echo(f"  fedmq simulate --project {where}")
    typer.echo(f"  fedmq serve --config {where}/federation.toml")
    typer.echo(f"  fedmq-agent run --config {where}/agent.toml")
