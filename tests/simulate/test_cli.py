"""`fedmq simulate` refuses bad input with a clear message and a non-zero exit, early."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmq.cli.app import app
from fedmq.exit_codes import CONFIG_ERROR as EXIT_CONFIG
from fedmq.exit_codes import USAGE as EXIT_USAGE


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--agents", "0"], EXIT_USAGE, "--agents"),
        (["--agents", "many"], EXIT_USAGE, "--agents"),
        (["--partition", "zipf:2"], EXIT_USAGE, "--partition"),
        (["--drop-rate", "1.5"], EXIT_USAGE, "--drop-rate"),
        (["--drop-rate", "lots"], EXIT_USAGE, "--drop-rate"),
        (["--model", "resnet50"], EXIT_USAGE, "--model"),
        (["--codec", "gzip"], EXIT_USAGE, "--codec"),
        (["--strategy", "best"], EXIT_USAGE, "--strategy"),
        (["--broker", "rabbitmq"], EXIT_USAGE, "--broker"),
        (["--deadline", "-1"], EXIT_USAGE, "--deadline"),
        (["--optimizer", "lbfgs"], EXIT_USAGE, "--optimizer"),
        (["--model", "digits_mlp", "--project", "p"], EXIT_USAGE, "not both"),
        (["--log-level", "loud"], EXIT_USAGE, "--log-level"),
        (["--project", "/nonexistent/plant"], EXIT_CONFIG, "no such directory"),
        # --broker mqtt(s)://HOST:PORT and its options (test_external_broker.py runs one)
        (["--ca-file", "ca.pem"], EXIT_USAGE, "--ca-file: only with --broker mqtt(s)://"),
        (["--broker", "mqtt://u:pw@h:1883"], EXIT_USAGE, "no credentials in the URL"),
        (["--broker", "ftp://h"], EXIT_USAGE, "--broker: broker URL 'ftp://h' must start"),
        (["--broker", "mqtt://h", "--protocol", "4"], EXIT_USAGE, "--protocol:"),
        (["--broker", "mqtt://h", "--max-packet-size", "10"], EXIT_USAGE, "--max-packet-size:"),
        (["--broker", "mqtt://h", "--ca-file", "ca.pem"], EXIT_USAGE, "--ca-file is set but"),
        (["--broker", "mqtts://h", "--ca-file", "/no/ca.pem"], EXIT_USAGE, "does not exist"),
        (["--topic-root", "a/#"], EXIT_USAGE, "--topic-root"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], code: int, fragment: str) -> None:
    result = CliRunner().invoke(app, ["simulate", *args, "--out", str(tmp_path / "r")])
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert not (tmp_path / "r" / "aggregator").exists()  # nothing ran


def test_an_out_dir_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "paper.tex").write_text("keep me")
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path)])
    assert result.exit_code == EXIT_USAGE
    assert "paper.tex" in result.output
    assert (tmp_path / "paper.tex").read_text() == "keep me"


def test_fedmq_variables_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_AGENT_CLIENT_ID", "everyone")
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "r")])
    assert result.exit_code == EXIT_CONFIG
    assert "FEDMQ_AGENT_CLIENT_ID" in result.output


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "simulate" in result.output
    assert "new" in result.output
