"""``initial``: reading exports, checkpoints and state directories back, and refusing misfits.

The runs on a real broker are in ``test_lifecycle_continue.py``; these check the reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.export_support import perturbed
from fedmq.aggregator.standalone import standalone_model
from fedmq.aggregator.store import checkpoint_file
from fedmq.aggregator.warm_start import load_initial
from fedmq.bundle import Bundle, Manifest, OnnxSource
from fedmq.bundle.manifest import MANIFEST_FILE
from fedmq.errors import ConfigError
from fedmq.wire.tensors import encode_tensors

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "examples" / "bundles"


def _with_source(bundle: Bundle, source: dict[str, object]) -> Bundle:
    manifest = bundle.manifest.model_copy(update={"source": OnnxSource.model_validate(source)})
    files = bundle.files()
    files[MANIFEST_FILE] = Manifest.model_validate(manifest.model_dump()).to_json()
    return Bundle.from_files(files)


def _imported(scale: float = 1.0) -> Bundle:
    """digits_mlp as if compiled from an ONNX file with its own names and layouts."""
    return _with_source(
        Bundle.load(BUNDLES / "digits_mlp"),
        {
            "input": {"name": "features", "dtype": "float32", "shape": ["N", 64]},
            "output": {"name": "scores", "dtype": "float32", "shape": ["N", 10]},
            "initializers": [
                {"tensor": "0.weight", "name": "W1", "transpose": True},
                {"tensor": "0.bias", "name": "b1"},
                {"tensor": "2.weight", "name": "input"},  # clashes with fedmq's own names
                {"tensor": "2.bias", "name": "output", "scale": scale},
            ],
        },
    )


def _write_params(path: Path, params: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(encode_tensors(params).data))
    return path


def _assert_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_an_export_of_an_imported_model_reads_back_exactly(tmp_path: Path) -> None:
    bundle = _imported()
    state = perturbed(bundle, 5)
    path = tmp_path / "model.onnx"
    path.write_bytes(standalone_model(bundle, state))
    params, where = load_initial(str(path), bundle)
    assert where == f"ONNX model {path}"
    _assert_equal(params, state)  # renamed, transposed back: bit for bit


def test_a_scaled_layout_reads_back_within_one_rounding(tmp_path: Path) -> None:
    bundle = _imported(scale=0.3)
    state = perturbed(bundle, 6)
    path = tmp_path / "model.onnx"
    path.write_bytes(standalone_model(bundle, state))
    params, _ = load_initial(str(path), bundle)
    np.testing.assert_array_equal(params["0.weight"], state["0.weight"])
    np.testing.assert_allclose(params["2.bias"], state["2.bias"], rtol=2**-23, atol=0)


def test_buffers_no_export_holds_come_from_the_bundle(tmp_path: Path) -> None:
    bundle = Bundle.load(BUNDLES / "digits_cnn")
    state = perturbed(bundle, 7)  # num_batches_tracked advanced, but not exported
    path = tmp_path / "model.onnx"
    path.write_bytes(standalone_model(bundle, state))
    params, _ = load_initial(str(path), bundle)
    expected = dict(state)
    expected["1.num_batches_tracked"] = bundle.initial_parameters()["1.num_batches_tracked"]
    _assert_equal(params, expected)
    assert params["1.num_batches_tracked"].shape == ()


def test_checkpoint_files_and_rounds_of_a_state_directory(tmp_path: Path) -> None:
    bundle = Bundle.load(BUNDLES / "digits_mlp")
    rounds = {0: bundle.initial_parameters(), 4: perturbed(bundle, 1), 7: perturbed(bundle, 2)}
    source = tmp_path / "source"
    for round_id, params in rounds.items():
        _write_params(checkpoint_file(source, round_id), params)
    latest, where = load_initial(str(source), bundle)
    assert where == f"round 7 of state directory {source}"
    _assert_equal(latest, rounds[7])
    _assert_equal(load_initial(f"{source}@4", bundle)[0], rounds[4])
    _assert_equal(load_initial(str(checkpoint_file(source, 0)), bundle)[0], rounds[0])
    with pytest.raises(ConfigError, match=r"no checkpoint of round 5, only of rounds 0, 4, 7"):
        load_initial(f"{source}@5", bundle)
    with pytest.raises(ConfigError, match="does not exist"):
        load_initial(str(tmp_path / "nowhere"), bundle)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        load_initial(str(tmp_path), bundle)
    garbage = tmp_path / "garbage.params"
    garbage.write_bytes(b"not a tensor set")
    with pytest.raises(ConfigError, match="is not a fedmq tensor set"):
        load_initial(str(garbage), bundle)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\xff\x00 not protobuf")
    with pytest.raises(ConfigError, match="is not a readable ONNX model"):
        load_initial(str(broken), bundle)


def test_every_kind_of_misfit_is_listed(tmp_path: Path) -> None:
    bundle = Bundle.load(BUNDLES / "digits_mlp")
    params = bundle.initial_parameters()
    del params["2.bias"]  # missing
    params["0.weight"] = np.zeros((3, 3), np.float32)  # wrong shape
    params["0.bias"] = params["0.bias"].astype(np.float64)  # wrong dtype
    params["2.weight"] = params["2.weight"].copy()
    params["2.weight"][0, :3] = [np.nan, np.inf, -np.inf]  # not finite
    params["extra"] = np.zeros(2, np.float32)  # not in the bundle
    params["more"] = np.zeros(2, np.float32)
    path = _write_params(tmp_path / "bad.params", params)
    with pytest.raises(ConfigError) as caught:
        load_initial(str(path), bundle)
    message = str(caught.value)
    assert message.startswith(
        f"initial = '{path}' (tensor set {path}) does not fit the bundle 'digits_mlp' (6 problems)"
    )
    for problem in (
        "0.weight: shape [3, 3], the bundle's [64, 64]",
        "0.bias: dtype float64, the bundle's float32",
        "2.weight: 3 non-finite values (NaN or Inf)",
        "2.bias: missing",
        "extra: not in the bundle",
    ):
        assert f"\n  {problem}" in message
    assert message.endswith("\n  … and 1 more")  # `more`: the first five are listed


def test_an_export_of_another_model_is_refused_by_name(tmp_path: Path) -> None:
    cnn = Bundle.load(BUNDLES / "digits_cnn")
    path = tmp_path / "cnn.onnx"
    path.write_bytes(standalone_model(cnn, cnn.initial_parameters()))
    with pytest.raises(ConfigError, match="does not fit the bundle 'digits_mlp'") as caught:
        load_initial(str(path), Bundle.load(BUNDLES / "digits_mlp"))
    assert "2.weight: missing" in str(caught.value)
