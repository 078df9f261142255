"""Local data sources: the CSV and .npz layouts, entry points, eval split, model fitting."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.scripted import BUNDLES
from edge_agent.config import DataConfig
from edge_agent.data import DataError, RawData, fit_to_model, load_raw, parse_csv, split
from fedmq.bundle.bundle import Bundle
from fedmq.errors import ConfigError, TrainingError

MLP = Bundle.load(BUNDLES / "digits_mlp").manifest
CNN = Bundle.load(BUNDLES / "digits_cnn").manifest
AUTOENCODER = Bundle.load(BUNDLES / "sensor_autoencoder").manifest

names = st.text(string.ascii_letters + "_", min_size=1, max_size=8)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], np.ndarray[Any, Any], int]:
    columns = draw(st.lists(names, min_size=2, max_size=6, unique=True))
    rows = draw(st.integers(0, 12))
    values = draw(hnp.arrays(np.float64, (rows, len(columns)), elements=finite))
    label = draw(st.integers(0, len(columns) - 1))
    return columns, values, label


def to_csv(columns: list[str], values: np.ndarray[Any, Any], spacing: str = "") -> str:
    lines = [",".join(f"{spacing}{c}" for c in columns)]
    lines += [",".join(repr(float(v)) for v in row) for row in values]
    return "\n".join(lines) + "\n"


@settings(max_examples=150)
@given(table=tables(), spacing=st.sampled_from(["", " "]))
def test_csv_layout_round_trips(table: tuple[list[str], Any, int], spacing: str) -> None:
    columns, values, label = table
    parsed = parse_csv(to_csv(columns, values, spacing), label_column=columns[label])
    assert parsed.y is not None
    np.testing.assert_array_equal(parsed.y, values[:, label])
    np.testing.assert_array_equal(parsed.x, np.delete(values, label, axis=1))


@settings(max_examples=300)
@given(text=st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_data_error(text: str) -> None:
    try:
        parsed = parse_csv(text, label_column="label")
    except DataError:
        return
    assert parsed.x.ndim == 2
    assert parsed.y is not None
    assert parsed.y.shape == (parsed.x.shape[0],)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("a,label\n1,2,3\n", "line 2: 3 fields", id="ragged-row"),
        pytest.param("a,label\n1,x\n", "line 2, column 'label'", id="not-a-number"),
        pytest.param("a,label\n1,nan\n", "not finite", id="nan"),
        pytest.param("a,a,label\n1,2,3\n", "unique", id="duplicate-header"),
        pytest.param("a,b\n1,2\n", "no label column", id="no-label"),
        pytest.param("label\n1\n", "no feature", id="only-label"),
        pytest.param('a,label\n"1,2\n', "CSV", id="unterminated-quote"),
    ],
)
def test_malformed_csv_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_csv(text, label_column="label")


def test_autoencoder_csv_has_no_label() -> None:
    parsed = parse_csv("a,b\n1,2\n\n3,4\n", label_column=None)
    assert parsed.y is None
    np.testing.assert_array_equal(parsed.x, [[1, 2], [3, 4]])


def config(path: Path, **fields: Any) -> DataConfig:
    return DataConfig(path=path, **fields)


def test_npz_directory_with_eval_subdirectory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, count in (("b.npz", 5), ("a.npz", 3)):
        np.savez(tmp_path / name, x=rng.random((count, 64)), y=rng.integers(0, 10, count))
    (tmp_path / "eval").mkdir()
    np.savez(tmp_path / "eval" / "e.npz", x=rng.random((4, 64)), y=rng.integers(0, 10, 4))
    train, evaluation = load_raw(config(tmp_path))
    assert train.x.shape == (8, 64)
    assert evaluation is not None
    assert evaluation.x.shape == (4, 64)
    dataset = fit_to_model(train, evaluation, CNN)
    assert dataset.x_train.shape == (8, 1, 8, 8)
    assert dataset.x_train.dtype == np.float32
    assert dataset.y_train.dtype == np.int64


def test_csv_directory_feeds_mlp_and_cnn(tmp_path: Path) -> None:
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    rows = [",".join(["0.5"] * 64 + [str(i % 10)]) for i in range(10)]
    (tmp_path / "day1.csv").write_text("\n".join([header, *rows]) + "\n")
    train, evaluation = load_raw(config(tmp_path, eval_fraction=0.3, seed=1))
    assert train.x.shape == (7, 64)
    assert evaluation is not None
    assert evaluation.x.shape == (3, 64)
    assert fit_to_model(train, evaluation, MLP).x_train.shape == (7, 64)
    assert fit_to_model(train, evaluation, CNN).x_eval.shape == (3, 1, 8, 8)


def test_split_is_seeded_and_disjoint() -> None:
    data = RawData(np.arange(20.0).reshape(10, 2), np.arange(10.0))
    train, held = split(data, 0.3, seed=4)
    again, _ = split(data, 0.3, seed=4)
    assert held is not None
    np.testing.assert_array_equal(train.x, again.x)
    assert sorted([*train.y.tolist(), *held.y.tolist()]) == list(range(10))  # type: ignore[union-attr]
    assert split(RawData(np.ones((1, 2)), np.ones(1)), 0.5, 0)[1] is None


def test_autoencoder_target_is_the_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "windows.npz", x=np.random.default_rng(0).random((6, 3, 64)))
    train, evaluation = load_raw(config(tmp_path, target="input", eval_fraction=0.0))
    assert evaluation is None
    dataset = fit_to_model(train, evaluation, AUTOENCODER, "input")
    np.testing.assert_array_equal(dataset.y_train, dataset.x_train)
    assert dataset.num_eval == 0


@pytest.mark.parametrize(
    ("arrays", "manifest", "message"),
    [
        pytest.param({"x": np.ones((4, 63)), "y": np.zeros(4)}, MLP, "63 input", id="width"),
        pytest.param({"x": np.ones((4, 64)), "y": np.full(4, 10)}, MLP, "10 classes", id="class"),
        pytest.param({"x": np.ones((4, 64)), "y": np.full(4, 0.5)}, MLP, "whole", id="frac"),
        pytest.param({"x": np.ones((4, 64))}, MLP, "no array 'y'", id="no-labels"),
        pytest.param({"x": np.ones((4, 64)), "y": np.zeros(3)}, MLP, "labels of shape", id="n"),
        pytest.param({"x": np.full((4, 64), np.inf), "y": np.zeros(4)}, MLP, "infinity", id="inf"),
    ],
)
def test_data_that_does_not_fit_is_a_data_error(
    tmp_path: Path, arrays: dict[str, Any], manifest: Any, message: str
) -> None:
    np.savez(tmp_path / "d.npz", **arrays)

    def load_and_fit() -> None:
        train, evaluation = load_raw(config(tmp_path, eval_fraction=0.0))
        fit_to_model(train, evaluation, manifest)

    with pytest.raises(DataError, match=message):
        load_and_fit()


def test_empty_or_ambiguous_directories(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \.npz or \.csv"):
        load_raw(config(tmp_path))
    np.savez(tmp_path / "a.npz", x=np.ones((2, 64)), y=np.zeros(2))
    (tmp_path / "b.csv").write_text("a,label\n1,0\n")
    with pytest.raises(DataError, match="both"):
        load_raw(config(tmp_path))
    assert load_raw(config(tmp_path, format="csv", eval_fraction=0.0))[0].x.shape == (1, 1)
    assert issubclass(DataError, TrainingError)


def test_not_an_npz_file(tmp_path: Path) -> None:
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="not a readable"):
        load_raw(config(tmp_path))


ENTRY_MODULE = """
import numpy as np

def load(count=8):
    x = np.ones((count, 64), np.float32)
    return x, np.zeros(count, np.int64)

def load_split():
    x, x_eval = np.ones((5, 64)), np.ones((2, 64))
    return {"x": x, "y": np.zeros(5), "x_eval": x_eval, "y_eval": np.ones(2)}

def broken():
    raise RuntimeError("sensor bus offline")

def wrong():
    return 42
"""


@pytest.fixture
def entry_module(tmp_path: Path) -> Path:
    (tmp_path / "plant_loader_for_tests.py").write_text(ENTRY_MODULE)
    return tmp_path


def entry(path: Path, function: str, **fields: Any) -> DataConfig:
    return DataConfig(entry_point=f"plant_loader_for_tests:{function}", module_path=path, **fields)


def test_entry_point_with_options_and_split(entry_module: Path) -> None:
    train, evaluation = load_raw(entry(entry_module, "load", options={"count": 10}))
    assert train.x.shape == (8, 64)  # 20 % held out
    assert evaluation is not None
    train, evaluation = load_raw(entry(entry_module, "load_split"))
    assert (train.x.shape[0], evaluation.x.shape[0] if evaluation else 0) == (5, 2)


def test_entry_point_failures(entry_module: Path) -> None:
    with pytest.raises(DataError, match="sensor bus offline"):
        load_raw(entry(entry_module, "broken"))
    with pytest.raises(DataError, match="must return"):
        load_raw(entry(entry_module, "wrong"))
    with pytest.raises(ConfigError, match="not a callable"):
        load_raw(entry(entry_module, "absent"))
    with pytest.raises(ConfigError, match="cannot import"):
        load_raw(DataConfig(entry_point="no_such_module_xyz:load"))
