"""``fedmq compile`` end to end through the typer app."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmq import exit_codes
from fedmq.bundle import Bundle
from fedmq.cli.app import app

pytestmark = pytest.mark.compile

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models.py"


def test_compile_factory_with_frozen_backbone(tmp_path: Path) -> None:
    out = tmp_path / "head_only"
    result = CliRunner().invoke(
        app,
        [
            "compile",
            f"{MODELS}:digits_mlp",
            "--input-shape",
            "64",
            "--loss",
            "cross_entropy",
            "--trainable",
            "2.*",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "650 trainable" in result.output
    manifest = Bundle.load(out).manifest
    assert manifest.name == "head_only"
    assert manifest.trainable_names == ("2.weight", "2.bias")
    assert manifest.update_names == ("2.weight", "2.bias")
    assert [t.name for t in manifest.tensors if not t.trainable] == ["0.weight", "0.bias"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_module:factory", "--input-shape", "4"], "cannot import no_such_module"),
        ([f"{MODELS}:digits_mlp"], "--input-shape is required"),
        ([f"{MODELS}:nothing", "--input-shape", "64"], "no callable 'nothing'"),
        ([f"{MODELS}:digits_mlp", "--input-shape", "3"], "failed on an example input"),
        ([f"{MODELS}:digits_mlp", "--input-shape", "64", "--trainable", "x*"], "matches no"),
    ],
)
def test_compile_errors_exit_with_compile_code(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(app, ["compile", *args, "--out", str(tmp_path / "b")])
    assert result.exit_code == exit_codes.COMPILE_ERROR
    assert message in result.output
    assert not (tmp_path / "b").exists()


def test_list_params_of_a_factory_shows_what_trainable_selects(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["compile", f"{MODELS}:digits_cnn", "--list-params", "--trainable", "9.*"]
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert list(rows) == [
        *("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias", "9.weight", "9.bias"),
        *("1.running_mean", "1.running_var", "1.num_batches_tracked"),
    ]
    assert rows["9.weight"] == ["9.weight", "[10,", "16]", "float32", "parameter", "yes"]
    assert rows["0.weight"][-1] == "no"
    assert rows["1.num_batches_tracked"] == ["1.num_batches_tracked", "[]", "int64", "buffer", "no"]


def test_out_is_required_to_compile(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compile", f"{MODELS}:digits_mlp", "--input-shape", "64"])
    assert result.exit_code == exit_codes.USAGE
    assert "--out is required" in result.output
