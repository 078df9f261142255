"""Builds the inference models the coordinator releases, and keeps them in the state directory.

The coordinator asks for a model with a
:class:`~fedmq.coordinator.actions.BuildInferenceModel` command
(:mod:`fedmq.coordinator.releases`); the service hands the command to
:class:`ModelDelivery`, which builds the standalone ONNX model exactly as ``fedmq export``
does (:func:`~fedmq.aggregator.standalone.standalone_model`, in a worker thread: it is
CPU work), stores it durably and returns its bytes, which the service gives back with
``Coordinator.set_inference_model``.  Builds run one at a time, oldest first; a build
whose checkpoint a newer request has overtaken is skipped.

::

    <state_dir>/models/<sha256>.onnx    the models the snapshot lists (released or candidates)

After a restart :meth:`ModelDelivery.stored` reads them back for ``provide_models``, so
the releases (also those of a finished federation) are published again unchanged.
``onnx`` belongs to the server extra: without it no model is built, once logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

from fedmq.bundle import Bundle
from fedmq.coordinator.actions import BuildInferenceModel
from fedmq.durable_files import write_file
from fedmq.errors import BundleError, DecodeError
from fedmq.wire.archive import unpack_files
from fedmq.wire.blobs import BlobRef
from fedmq.wire.tensors import decode_tensors

log = logging.getLogger(__name__)

MODELS_DIR = "models"
MODEL_SUFFIX = ".onnx"


class ModelBuildError(Exception):
    """A model could not be built; the text says why (for the coordinator's warning)."""


def build_standalone(bundle: Bundle, params_blob: bytes) -> bytes:
    """The standalone inference model of ``bundle`` with the tensor set ``params_blob``.

    Raises:
        ModelBuildError: ``onnx`` is not installed, the parameters do not decode, or the
            bundle's graph does not take them.
    """
    try:
        # onnx is in the server extra only (as for `fedmq export`).
        from fedmq.aggregator.standalone import standalone_model  # noqa: PLC0415
    except ImportError as exc:
        raise ModelBuildError(
            f"the onnx package is not installed ({exc}): pip install 'fedmq[server]'"
        ) from exc
    try:
        params = decode_tensors(params_blob)
        return standalone_model(bundle, params)
    except (BundleError, DecodeError) as exc:
        raise ModelBuildError(str(exc)) from exc
    except Exception as exc:  # onnx's own errors: delivery must never stop the federation
        raise ModelBuildError(f"{type(exc).__name__}: {exc}") from exc


class ModelDelivery:
    """The service's model builder and the ``models/`` directory of its state directory.

    Args:
        state_dir: the aggregator's state directory (the service holds its lock).
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / MODELS_DIR
        self._bundle: tuple[str, Bundle] | None = None  # parsed once per archive
        self._newest = -1  # the newest checkpoint a build was asked for
        self._slot = asyncio.Lock()  # one build at a time, in the order asked
        self._warned = False

    def path(self, sha256: str) -> Path:
        """Where the model ``sha256`` is stored."""
        return self.directory / f"{sha256}{MODEL_SUFFIX}"

    def asked(self, action: BuildInferenceModel) -> None:
        """Note a build request (call when it is dispatched, before :meth:`build`)."""
        self._newest = max(self._newest, action.checkpoint)

    async def build(self, action: BuildInferenceModel) -> bytes | None:
        """Build and store the model ``action`` asks for; None when a newer one overtook it.

        Raises:
            ModelBuildError: the model could not be built.
            OSError: it could not be stored.
        """
        async with self._slot:
            if action.checkpoint < self._newest:
                log.debug("skipping the inference model of checkpoint %d", action.checkpoint)
                return None
            return await asyncio.to_thread(self._build, action)

    def _build(self, action: BuildInferenceModel) -> bytes:
        digest = hashlib.sha256(action.bundle).hexdigest()
        if self._bundle is None or self._bundle[0] != digest:
            try:
                files = {name: bytes(data) for name, data in unpack_files(action.bundle).items()}
                self._bundle = (digest, Bundle.from_files(files))
            except (BundleError, DecodeError) as exc:
                raise ModelBuildError(f"the bundle archive does not load: {exc}") from exc
        model = build_standalone(self._bundle[1], action.params)
        self.directory.mkdir(parents=True, exist_ok=True)
        write_file(self.path(hashlib.sha256(model).hexdigest()), model)
        return model

    def failed(self, error: ModelBuildError) -> bool:
        """Whether to report a failed build (a missing onnx package is reported once)."""
        if "onnx package is not installed" not in str(error):
            return True
        first, self._warned = not self._warned, True
        return first

    def stored(self, refs: Iterable[BlobRef]) -> dict[str, bytes]:
        """The stored bytes of the models ``refs`` name (missing or damaged ones left out)."""
        found: dict[str, bytes] = {}
        for ref in refs:
            try:
                data = self.path(ref.sha256).read_bytes()
            except OSError as exc:
                log.warning("inference model %s… is not readable: %s", ref.sha256[:12], exc)
                continue
            if hashlib.sha256(data).hexdigest() == ref.sha256:
                found[ref.sha256] = data
            else:
                log.warning("inference model file %s is damaged", self.path(ref.sha256))
        return found

    def prune(self, keep: Iterable[str]) -> None:
        """Delete stored models other than ``keep`` (sha256s): no snapshot names them."""
        wanted = {f"{sha}{MODEL_SUFFIX}" for sha in keep}
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.endswith(MODEL_SUFFIX) and path.name not in wanted:
                path.unlink(missing_ok=True)


__all__ = ["MODELS_DIR", "ModelBuildError", "ModelDelivery", "build_standalone"]
