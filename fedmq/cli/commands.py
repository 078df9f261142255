"""The ``fedmq`` typer app: one module per command group (needs the server extra)."""

from __future__ import annotations

import typer

from fedmq.cli.clear_cmd import clear_command
from fedmq.cli.compile_cmd import compile_command
from fedmq.cli.monitor_cmd import monitor_command
from fedmq.cli.new_cmd import new_command
from fedmq.cli.pki_cmd import pki_app
from fedmq.cli.report_cmd import report_command
from fedmq.cli.schema_cmd import schema_command
from fedmq.cli.serve_cmd import export_command, serve_command
from fedmq.cli.simulate_cmd import simulate_command

app = typer.Typer(
    name="fedmq",
    help="Federated learning for factory edge devices over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


app.command("compile")(compile_command)
app.command("serve")(serve_command)
app.command("export")(export_command)
app.command("simulate")(simulate_command)
app.command("new")(new_command)
app.command("clear")(clear_command)
app.command("report")(report_command)
app.command("monitor")(monitor_command)
app.command("schema")(schema_command)
app.add_typer(pki_app, name="pki")


@app.callback()
def _root() -> None:
    """Federated learning for factory edge devices over MQTT."""
