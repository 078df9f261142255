"""The shipped systemd unit agrees with the agent's behaviour (exit codes, timeouts)."""

from __future__ import annotations

import configparser
from pathlib import Path

from edge_agent.daemon import STOP_GRACE
from fedmq.exit_codes import CONFIG_ERROR as EXIT_CONFIG

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "fedmq-agent.service"


def test_unit_matches_the_agent() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert "fedmq-agent run --config" in service["ExecStart"]
    assert service["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    # systemd must wait longer than the agent's own shutdown takes.
    assert float(service["TimeoutStopSec"]) > 10 > STOP_GRACE
    assert float(service["WatchdogSec"]) > 0
    assert service["StateDirectory"] == "fedmq-agent"
