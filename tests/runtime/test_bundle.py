"""Bundle loading and validation: every inconsistency is a BundleError."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedmq.bundle import BUNDLE_FILES, Bundle, Manifest, read_parameters, write_parameters
from fedmq.bundle.bundle import sha256_hex
from fedmq.errors import BundleError


def test_shipped_bundles_load_and_are_small(bundles_dir: Path) -> None:
    for name in ("digits_mlp", "digits_cnn", "sensor_autoencoder"):
        bundle = Bundle.load(bundles_dir / name)
        assert bundle.manifest.name == name
        size = sum(len(data) for data in bundle.files().values())
        assert size < 100 * 1024
        assert (
            bundle.files()["manifest.json"] == (bundles_dir / name / "manifest.json").read_bytes()
        )


def test_write_then_load_round_trips(mlp_bundle: Bundle, tmp_path: Path) -> None:
    loaded = Bundle.load(mlp_bundle.write(tmp_path / "copy"))
    assert loaded.files() == mlp_bundle.files()
    for name, value in mlp_bundle.initial_parameters().items():
        np.testing.assert_array_equal(loaded.initial_parameters()[name], value)


def test_initial_parameters_are_fresh_writable_copies(mlp_bundle: Bundle) -> None:
    first = mlp_bundle.initial_parameters()
    first["0.bias"][:] = 42
    assert not (mlp_bundle.initial_parameters()["0.bias"] == 42).any()


@pytest.mark.parametrize("victim", ["train_step.onnx", "model.onnx", "parameters.npz"])
def test_tampered_file_fails_its_digest(mlp_bundle: Bundle, victim: str) -> None:
    files = mlp_bundle.files()
    files[victim] = files[victim][:-1] + bytes([files[victim][-1] ^ 1])
    with pytest.raises(BundleError, match=f"{victim} has sha256"):
        Bundle.from_files(files)


def test_missing_and_extra_files(mlp_bundle: Bundle, tmp_path: Path) -> None:
    files = mlp_bundle.files()
    with pytest.raises(BundleError, match="missing"):
        Bundle.from_files({k: v for k, v in files.items() if k != "model.onnx"})
    with pytest.raises(BundleError, match="unexpected"):
        Bundle.from_files({**files, "evil.sh": b""})
    mlp_bundle.write(tmp_path / "b")
    (tmp_path / "b" / "parameters.npz").unlink()
    with pytest.raises(BundleError, match=r"parameters\.npz is missing"):
        Bundle.load(tmp_path / "b")
    with pytest.raises(BundleError, match="not a bundle directory"):
        Bundle.load(tmp_path / "nothing")


def _with_parameters(bundle: Bundle, npz: bytes) -> dict[str, bytes]:
    raw = json.loads(bundle.manifest.to_json())
    raw["files"]["parameters.npz"] = sha256_hex(npz)
    return {**bundle.files(), "manifest.json": json.dumps(raw).encode(), "parameters.npz": npz}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: {k: v for k, v in p.items() if k != "2.bias"}, r"missing \['2.bias'\]"),
        (lambda p: {**p, "x": np.zeros(1, np.float32)}, r"unexpected \['x'\]"),
        (lambda p: {**p, "2.bias": np.zeros(3, np.float32)}, "declares"),
        (lambda p: {**p, "2.bias": np.zeros(10, np.float64)}, "declares"),
        (lambda p: {**p, "2.bias": np.array([object()] * 10)}, "declares|valid npz"),
    ],
)
def test_parameters_must_match_the_manifest(
    mlp_bundle: Bundle, change: object, message: str
) -> None:
    arrays = change(mlp_bundle.initial_parameters())  # type: ignore[operator]
    with pytest.raises(BundleError, match=message):
        Bundle.from_files(_with_parameters(mlp_bundle, _npz(arrays)))


def test_parameters_reject_short_data_and_non_zip(mlp_bundle: Bundle) -> None:
    manifest = mlp_bundle.manifest
    with pytest.raises(BundleError, match="not a valid npz"):
        read_parameters(b"not a zip", manifest)
    good = write_parameters(mlp_bundle.initial_parameters())
    # Truncate one member's payload while keeping a well-formed zip.
    source = zipfile.ZipFile(io.BytesIO(good))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data[:-4] if info.filename == "0.weight.npy" else data)
    with pytest.raises(BundleError, match=r"holds \d+ data bytes"):
        read_parameters(buffer.getvalue(), manifest)


def test_parameter_archive_is_byte_reproducible(mlp_bundle: Bundle) -> None:
    params = mlp_bundle.initial_parameters()
    assert write_parameters(params) == write_parameters(params) == mlp_bundle.parameters_npz
    scalar = write_parameters({"s": np.array(3, dtype=np.int64)})
    with zipfile.ZipFile(io.BytesIO(scalar)) as archive:
        assert np.load(archive.open("s.npy"), allow_pickle=False).shape == ()


def test_bundle_files_constant() -> None:
    assert BUNDLE_FILES == ("manifest.json", "train_step.onnx", "model.onnx", "parameters.npz")
    assert Manifest.model_fields["format_version"].default == 1
