"""``fedmq schema`` prints the control messages' JSON Schemas, and docs/protocol.md says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmq.cli.commands import app
from fedmq.wire.control import control_schemas

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_fedmq_schema_prints_every_schema_keyed_by_type() -> None:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == control_schemas()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("aggregator_status", "aggregator_status"),
        ("agent-status", "agent_status"),
        ("announcement", "round"),
        ("round", "round"),
        ("ack", "ack"),
    ],
)
def test_fedmq_schema_prints_one_schema(name: str, kind: str) -> None:
    result = CliRunner().invoke(app, ["schema", name])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema == control_schemas()[kind]
    assert schema["properties"]["type"]["const"] == kind


def test_the_aggregator_status_schema_names_what_an_operator_reads() -> None:
    properties = control_schemas()["aggregator_status"]["properties"]
    for name in ("missing", "missing_count", "bytes_in", "bytes_out", "last_round", "rounds"):
        assert name in properties
    assert properties["missing"]["maxItems"] == 50


def test_an_unknown_type_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["schema", "blob"])
    assert result.exit_code == 2
    assert "aggregator_status" in result.output


def test_the_docs_show_the_commands_that_exist() -> None:
    protocol = (DOCS / "protocol.md").read_text(encoding="utf-8")
    operations = (DOCS / "operations.md").read_text(encoding="utf-8")
    assert "fedmq schema" in protocol
    for command in ("fedmq schema", "fedmq monitor", "mosquitto_sub -v -t 'fedmq/+/round'"):
        assert command in operations
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    assert "docs/operations.md" in readme
