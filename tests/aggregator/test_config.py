"""federation.toml + FEDMQ_* environment: precedence, relative paths, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.aggregator.config import load_settings
from fedmq.coordinator.selection import SelectFraction
from fedmq.errors import ConfigError

TOML = """
federation = "plant7"
bundle = "bundles/mlp"
state_dir = "state"
rounds = 20

[broker]
url = "mqtts://broker.plant:8883"
ca_file = "pki/ca.pem"

[round]
deadline_s = 120
min_updates = 3
target_updates = 8
selection = "fraction"
fraction = 0.5
seed = 7
late_updates = "fold"

[strategy]
name = "fedadam"
eta = 0.05
clip_norm = 5.0

[training]
epochs = 2
lr = 0.05
"""


def _write(tmp_path: Path, text: str = TOML) -> Path:
    # TLS files named in [broker] must exist: a typo in a path is a config error.
    (tmp_path / "pki").mkdir(exist_ok=True)
    (tmp_path / "pki" / "ca.pem").write_text("(a CA certificate)", encoding="utf-8")
    path = tmp_path / "federation.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_file_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path))
    assert settings.bundle == (tmp_path / "bundles" / "mlp").resolve()
    assert settings.state_dir == (tmp_path / "state").resolve()
    assert settings.broker.ca_file == (tmp_path / "pki" / "ca.pem").resolve()
    assert settings.client_id == "fedmq-aggregator-plant7"
    config = settings.coordinator_config()
    assert config.aggregator_id == "fedmq-aggregator-plant7"
    assert config.sync.selection == SelectFraction(0.5, 7)
    assert (config.sync.min_updates, config.sync.target_updates) == (3, 8)
    assert config.training.epochs == 2
    assert settings.strategy.name == "fedadam"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_ROUNDS", "5")
    monkeypatch.setenv("FEDMQ_ROUND__DEADLINE_S", "30")
    monkeypatch.setenv("FEDMQ_BROKER__PASSWORD", "s3cret")
    monkeypatch.setenv("FEDMQ_BROKER__CLIENT_ID", "agg-2")
    settings = load_settings(_write(tmp_path))
    assert settings.rounds == 5
    assert settings.round.deadline_s == 30
    assert settings.round.min_updates == 3  # the rest of [round] still comes from the file
    assert settings.broker_settings().password == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.client_id == "agg-2"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("rounds = 0", "rounds"),
        ('federation = "a/b"', "federation"),
        ("bogus = 1", "bogus"),
        ('codec = "zip"', "codec"),
        ("[round]\nmin_updates = 9\ntarget_updates = 2", "target_updates"),
        ('[broker]\nurl = "http://x"', "mqtt://"),
        ("[strategy]\ndp = { noise_multiplier = 1.0 }", "clip_norm"),
        ('[strategy]\nname = "fedsgd"', "strategy.name"),
        ('[strategy]\nname = "krum"\nbyzantine = 2', "min_updates >= 5"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, patch: str, message: str) -> None:
    lines = ['federation = "plant7"', 'bundle = "b"', 'state_dir = "s"', "rounds = 1"]
    key = patch.split("=", maxsplit=1)[0].strip()
    base = "\n".join(line for line in lines if not line.startswith(f"{key} ="))
    with pytest.raises(ConfigError, match=message):
        load_settings(_write(tmp_path, base + "\n" + patch + "\n"))


def test_missing_or_broken_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="TOML"):
        load_settings(_write(tmp_path, "rounds = ["))
    with pytest.raises(ConfigError, match="federation"):
        load_settings(_write(tmp_path, "rounds = 1"))


def test_missing_tls_file_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (tmp_path / "pki" / "ca.pem").unlink()
    with pytest.raises(ConfigError, match=r"ca_file .* does not exist"):
        load_settings(path)


def test_the_screening_table_configures_the_coordinator(tmp_path: Path) -> None:
    defaults = load_settings(_write(tmp_path)).coordinator_config().screening
    assert (defaults.max_examples, defaults.norm_mode, defaults.norm_factor) == (
        100_000,
        "reject",
        10.0,
    )
    assert defaults.max_norm is None
    text = TOML + '\n[screening]\nmax_examples = 5000\nnorm_mode = "clip"\nmax_norm = 50.0\n'
    screening = load_settings(_write(tmp_path, text)).coordinator_config().screening
    assert (screening.max_examples, screening.norm_mode, screening.max_norm) == (
        5000,
        "clip",
        50.0,
    )
    for patch, message in [
        ("max_examples = 0", "max_examples"),
        ("norm_factor = 1.0", "norm_factor"),
        ('norm_mode = "warn"', "norm_mode"),
        ("min_history = 100", "min_history"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings(_write(tmp_path, TOML + f"\n[screening]\n{patch}\n"))
