"""``fedmq-agent check``: the local data fitted to a bundle and run once, without a broker."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.helpers import write_digits
from agent.scripted import BUNDLES
from edge_agent.check import NO_BUNDLE_HINT, run_check
from edge_agent.config import AgentSettings, parse_settings
from edge_agent.state import PersistentState
from fedmq.bundle.bundle import Bundle
from fedmq.errors import BundleError, DataError
from fedmq.exit_codes import CONFIG_ERROR as EXIT_CONFIG
from fedmq.wire.archive import pack_files

MLP = BUNDLES / "digits_mlp"


def settings_for(tmp_path: Path, data: Path, **data_options: Any) -> AgentSettings:
    return parse_settings(
        {
            "client_id": "press-07",
            "federation": "line-3",
            "state_dir": str(tmp_path / "state"),
            "broker": {"url": "mqtt://broker.invalid"},  # never contacted
            "data": {"path": str(data), **data_options},
        }
    )


def check(settings: AgentSettings, bundle: Path | None = MLP) -> list[str]:
    lines: list[str] = []
    run_check(settings, bundle, lines.append)
    return lines


def digits_csv(directory: Path, rows: int = 40, *, drop_column: bool = False) -> Path:
    """The digits as the CSV layout of docs/agent.md: px0..px63, label."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data[:rows] / 16.0
    if drop_column:
        x = x[:, :-1]
    header = [f"px{i}" for i in range(x.shape[1])] + ["label"]
    lines = [",".join(header)]
    lines += [
        ",".join(f"{v:g}" for v in row) + f",{y}" for row, y in zip(x, bunch.target, strict=False)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "readings.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def append_row(path: Path, row: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(row + "\n")


def test_good_data_fits_the_shipped_bundle_and_runs_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, write_digits(tmp_path / "data", 100))
    lines = check(settings)
    text = "\n".join(lines)
    assert "training data" in text
    assert "80 examples, inputs [64] float32, labels int64 in [0, 9]" in text
    assert "evaluation split: held out: data.eval_fraction 0.2" in text
    assert "bundle: digits_mlp" in text
    assert "forward pass (model.onnx, onnxruntime): 80 examples -> output [80, 10] float32" in text
    assert "initial model on 20 evaluation examples: loss" in text
    assert "accuracy" in text
    assert lines[-1] == "ok: the local data fits bundle digits_mlp"
    assert not (tmp_path / "state").exists()  # only read, never created


def test_the_cnn_takes_the_same_flat_csv(tmp_path: Path) -> None:
    data = tmp_path / "data"
    digits_csv(data)
    lines = check(settings_for(tmp_path, data), BUNDLES / "digits_cnn")
    assert any("as inputs [1, 8, 8] float32" in line for line in lines)
    assert lines[-1] == "ok: the local data fits bundle digits_cnn"


def test_without_a_bundle_or_cache_the_data_is_still_loaded_and_a_hint_given(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, write_digits(tmp_path / "data", 50))
    lines = check(settings, None)
    assert lines[0].startswith("training data")
    assert lines[-1] == NO_BUNDLE_HINT == "no bundle to fit against yet: pass --bundle DIR"


def test_without_a_bundle_the_agents_last_one_is_taken_from_its_blob_cache(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, write_digits(tmp_path / "data", 50))
    archive = pack_files(Bundle.load(MLP).files())
    sha = hashlib.sha256(archive).hexdigest()
    blobs = settings.state_dir / "cache" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / sha).write_bytes(archive)
    (blobs / ("0" * 64)).write_bytes(b"a parameter set, or anything else")
    state = PersistentState(federation="line-3", last_answered_round=7, bundle=sha)
    (settings.state_dir / "state.json").write_text(state.model_dump_json())

    lines = check(settings, None)
    assert any(
        f"cached bundle {sha[:12]}… (last used in round 7 (state.json))" in line for line in lines
    )
    assert lines[-1] == "ok: the local data fits bundle digits_mlp"


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        pytest.param(
            lambda d: digits_csv(d, drop_column=True),
            "each example has 63 input values ([63]); the model takes [64]",
            id="csv-column-count",
        ),
        pytest.param(
            lambda d: append_row(digits_csv(d), "0" + ",0" * 63 + ",12"),
            "class labels span [0, 12], the model has 10 classes",
            id="label-outside-the-classes",
        ),
        pytest.param(
            lambda d: append_row(digits_csv(d), "nan" + ",0" * 63 + ",1"),
            "line 42, column 'px0': 'nan' is not finite",
            id="csv-nan",
        ),
        pytest.param(
            lambda d: (d.mkdir(), np.savez(d / "x.npz", x=np.full((4, 64), np.nan), y=[1] * 4)),
            "inputs contain NaN or infinity",
            id="npz-nan",
        ),
        pytest.param(
            lambda d: (d.mkdir(), np.savez(d / "x.npz", x=np.zeros((4, 8, 9)), y=[1] * 4)),
            "each example has 72 input values ([8, 9]); the model takes [64]",
            id="npz-shape",
        ),
        pytest.param(lambda d: d.mkdir(), "no .npz or .csv files in", id="no-files"),
    ],
)
def test_bad_data_is_a_data_error_naming_the_problem(
    tmp_path: Path, write: Any, fragment: str
) -> None:
    data = tmp_path / "data"
    write(data)
    with pytest.raises(DataError) as caught:
        check(settings_for(tmp_path, data))
    assert fragment in str(caught.value)


def test_a_named_bundle_that_is_missing_is_an_error(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, write_digits(tmp_path / "data", 20))
    with pytest.raises(BundleError, match="not a bundle directory"):
        check(settings, tmp_path / "no-bundle")


# ---------------------------------------------------------------- the command


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
        check=False,
    )


def write_config(tmp_path: Path, data: Path) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_id = "press-07"\nfederation = "line-3"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[broker]\nurl = "mqtt://broker.invalid"\n[data]\npath = "{data}"\n'
    )
    return config


def test_the_command_exits_0_on_good_data_and_78_naming_bad_data(tmp_path: Path) -> None:
    data = write_digits(tmp_path / "data", 60)
    config = write_config(tmp_path, data)
    good = run_cli("check", "--config", str(config), "--bundle", str(MLP))
    assert good.returncode == 0, good.stderr
    assert '"client_id": "press-07"' in good.stdout  # the configuration, as before
    assert good.stdout.rstrip().endswith("ok: the local data fits bundle digits_mlp")

    np.savez(data / "train.npz", x=np.zeros((5, 63), np.float32), y=np.zeros(5, np.int64))
    bad = run_cli("check", "--config", str(config), "--bundle", str(MLP))
    assert bad.returncode == EXIT_CONFIG, bad.stdout + bad.stderr
    assert "fedmq-agent: data error: training data: each example has 63 input values" in (
        bad.stderr
    )
    assert "training data" in bad.stdout  # what was found before the problem
    assert "Traceback" not in bad.stderr


def test_the_command_without_a_bundle_hints_and_a_missing_named_bundle_fails(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, write_digits(tmp_path / "data", 30))
    hint = run_cli("check", "--config", str(config))
    assert hint.returncode == 0, hint.stderr
    assert hint.stdout.rstrip().endswith(NO_BUNDLE_HINT)
    missing = run_cli("check", "--config", str(config), "--bundle", str(tmp_path / "nothing"))
    assert missing.returncode == EXIT_CONFIG
    assert "fedmq-agent: bundle error:" in missing.stderr


def test_config_only_checks_the_configuration_before_any_data_exists(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()  # as provisioning leaves it: the plant software has not written yet
    config = write_config(tmp_path, data)
    result = run_cli("check", "--config-only", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["client_id"] == "press-07"  # only the configuration
    assert run_cli("check", "--config", str(config)).returncode == EXIT_CONFIG  # no data yet
    both = run_cli("check", "--config-only", "--bundle", str(MLP), "--config", str(config))
    assert both.returncode == 2  # argparse: not both
