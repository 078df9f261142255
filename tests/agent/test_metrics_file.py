"""The agent's node_exporter textfile: valid Prometheus text, written atomically, configured
by ``[metrics] textfile``; the agent itself never imports prometheus-client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.config import AgentSettings, load_settings
from edge_agent.metrics_file import AgentFigures, MetricsTextfile, RoundTimes
from fedmq.errors import ConfigError


def figures(**changes: object) -> AgentFigures:
    values: dict[str, object] = {
        "rounds_trained": 4,
        "rounds_failed": 1,
        "updates_acked": 3,
        "updates_dropped": 0,
        "bytes_sent": 123_456,
        "bytes_received": 9_876_543,
        "connections": 3,
        "last_round": 5,
        "times": RoundTimes(
            training_seconds=12.25, last_training_seconds=3.5, last_round_end=1.7e9
        ),
    }
    values.update(changes)
    return AgentFigures(**values)  # type: ignore[arg-type]


def parsed(text: str) -> dict[str, tuple[str, dict[str, str], float]]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = (family.type, sample.labels, sample.value)
    return found


def test_the_textfile_parses_with_prometheus_own_parser(tmp_path: Path) -> None:
    textfile = MetricsTextfile(tmp_path / "fedmq_agent.prom", 'press "7"\\', "line-3")
    textfile.write(figures())
    found = parsed((tmp_path / "fedmq_agent.prom").read_text(encoding="utf-8"))
    labels = {"client": 'press "7"\\', "federation": "line-3"}
    assert found["fedmq_agent_rounds_trained_total"] == ("counter", labels, 4)
    assert found["fedmq_agent_rounds_failed_total"] == ("counter", labels, 1)
    assert found["fedmq_agent_training_seconds_total"] == ("counter", labels, 12.25)
    assert found["fedmq_agent_bytes_sent_total"] == ("counter", labels, 123_456)
    assert found["fedmq_agent_reconnects_total"] == ("counter", labels, 2)
    assert found["fedmq_agent_last_round"] == ("gauge", labels, 5)
    assert found["fedmq_agent_last_training_seconds"] == ("gauge", labels, 3.5)
    assert found["fedmq_agent_last_round_timestamp_seconds"][2] == 1.7e9
    assert found["fedmq_agent_info"][1]["version"]
    assert [p.name for p in tmp_path.iterdir()] == ["fedmq_agent.prom"]  # no temporary left


def test_figures_not_known_yet_are_left_out(tmp_path: Path) -> None:
    textfile = MetricsTextfile(tmp_path / "a.prom", "press-7", "line-3")
    text = textfile.text(figures(last_round=None, times=RoundTimes(), connections=0))
    found = parsed(text)
    assert "fedmq_agent_last_round" not in found
    assert "fedmq_agent_last_training_seconds" not in found
    assert found["fedmq_agent_reconnects_total"][2] == 0


def test_rounds_add_up_in_the_times(tmp_path: Path) -> None:
    textfile = MetricsTextfile(None, "press-7", "line-3")
    textfile.trained(2.0)
    textfile.failed()
    textfile.trained(3.0)
    assert (textfile.times.training_seconds, textfile.times.last_training_seconds) == (5.0, 3.0)
    textfile.write(figures())  # no path: nothing to write, no error


def test_metrics_textfile_is_configured_in_agent_toml(
    make_settings: Callable[..., AgentSettings], tmp_path: Path
) -> None:
    settings = make_settings("mqtt://127.0.0.1:1883")
    assert settings.metrics.textfile is None
    assert settings.log_format == "text"
    settings = make_settings(
        "mqtt://127.0.0.1:1883", metrics={"textfile": str(tmp_path / "x.prom")}, log_format="json"
    )
    assert settings.metrics.textfile == tmp_path / "x.prom"
    assert settings.log_format == "json"
    with pytest.raises(ConfigError, match=r"metrics.textfile .* must end in \.prom"):
        make_settings("mqtt://127.0.0.1:1883", metrics={"textfile": str(tmp_path / "x.txt")})


def test_a_relative_textfile_is_relative_to_agent_toml(tmp_path: Path, digits_dir: Path) -> None:
    config = tmp_path / "etc" / "agent.toml"
    config.parent.mkdir()
    config.write_text(
        'client_id = "press-7"\nfederation = "line-3"\n'
        f'[broker]\nurl = "mqtt://127.0.0.1:1883"\n[data]\npath = "{digits_dir}"\n'
        '[metrics]\ntextfile = "prom/fedmq_agent.prom"\n',
        encoding="utf-8",
    )
    settings = load_settings(config)
    assert settings.metrics.textfile == tmp_path / "etc" / "prom" / "fedmq_agent.prom"
