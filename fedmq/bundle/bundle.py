"""Loading, validating and writing a model bundle (directory or in-memory files)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedmq.bundle.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    PARAMETERS_FILE,
    TRAIN_STEP_FILE,
    Manifest,
)
from fedmq.bundle.parameters import read_parameters
from fedmq.errors import BundleError

BUNDLE_FILES = (MANIFEST_FILE, TRAIN_STEP_FILE, MODEL_FILE, PARAMETERS_FILE)
MAX_FILE_BYTES = 2 * 1024**3  # protobuf cannot hold a larger ONNX model without external data


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (the digest the manifest records)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, eq=False)
class Bundle:
    """A validated model bundle held in memory.

    Build one with :meth:`load` (a directory) or :meth:`from_files` (bytes received
    over the wire); both check every sha256 and that ``parameters.npz`` matches the
    manifest, so code holding a ``Bundle`` can trust its parts agree.

    Attributes:
        manifest: the parsed manifest.
        train_step_onnx: bytes of ``train_step.onnx``.
        model_onnx: bytes of ``model.onnx``.
        parameters_npz: bytes of ``parameters.npz``.
    """

    manifest: Manifest
    train_step_onnx: bytes = field(repr=False)
    model_onnx: bytes = field(repr=False)
    parameters_npz: bytes = field(repr=False)
    _initial: dict[str, npt.NDArray[np.generic]] = field(repr=False)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> Bundle:
        """Validate a bundle given as file name to contents.

        Args:
            files: exactly the four bundle files (:data:`BUNDLE_FILES`).

        Raises:
            BundleError: a file is missing or extra, a digest does not match, the
                manifest is invalid or the parameters disagree with it.
        """
        missing = [name for name in BUNDLE_FILES if name not in files]
        extra = sorted(set(files) - set(BUNDLE_FILES))
        if missing or extra:
            raise BundleError(f"bundle files: missing {missing}, unexpected {extra}")
        manifest = Manifest.from_json(files[MANIFEST_FILE])
        for name, digest in manifest.files.items():
            actual = sha256_hex(files[name])
            if actual != digest:
                raise BundleError(
                    f"{name} has sha256 {actual}, the manifest says {digest}: "
                    f"the bundle is corrupt or its files come from different compiles"
                )
        initial = read_parameters(files[PARAMETERS_FILE], manifest)
        return cls(
            manifest=manifest,
            train_step_onnx=files[TRAIN_STEP_FILE],
            model_onnx=files[MODEL_FILE],
            parameters_npz=files[PARAMETERS_FILE],
            _initial=initial,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Bundle:
        """Read and validate the bundle stored in ``directory``.

        Raises:
            BundleError: the directory or a file is missing, too large, or inconsistent.
        """
        root = Path(directory)
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle directory")
        files: dict[str, bytes] = {}
        for name in BUNDLE_FILES:
            path = root / name
            try:
                size = path.stat().st_size
                if size > MAX_FILE_BYTES:
                    raise BundleError(f"{path} is {size} bytes, over {MAX_FILE_BYTES}")
                files[name] = path.read_bytes()
            except FileNotFoundError as exc:
                raise BundleError(
                    f"{path} is missing; a bundle holds {list(BUNDLE_FILES)}"
                ) from exc
            except OSError as exc:
                raise BundleError(f"cannot read {path}: {exc}") from exc
        return cls.from_files(files)

    def files(self) -> dict[str, bytes]:
        """The four bundle files, name to contents."""
        return {
            "manifest.json": self.manifest.to_json(),
            TRAIN_STEP_FILE: self.train_step_onnx,
            MODEL_FILE: self.model_onnx,
            PARAMETERS_FILE: self.parameters_npz,
        }

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write the bundle files into ``directory`` (created if needed) and return it."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (root / name).write_bytes(data)
        return root

    def initial_parameters(self) -> dict[str, npt.NDArray[np.generic]]:
        """Fresh writable copies of the compiled initial parameters and buffers."""
        return {name: array.copy() for name, array in self._initial.items()}
