"""``fedmq-agent check``: the local data against a model bundle, without a broker.

A round fails on data that is missing or does not fit the model, and the operator only
learns it from the status topic once a round ran.  ``check`` does the same work as the
start of a round, up front: load the data as configured (:func:`~edge_agent.data.load_raw`),
fit it to the bundle's manifest (:func:`~edge_agent.data.fit_to_model`) and run the
inference graph once on it with onnxruntime.

The bundle is the directory given with ``--bundle`` (a ``fedmq compile`` output), or
else the newest bundle in the agent's blob cache, which is the last one it downloaded
or trained (reading the blob cache's LRU order; ``state.json`` says which round used
it).  The state directory is only read: ``check`` takes no lock and creates nothing, so
it may run beside a live agent.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from edge_agent.blob_cache import blob_dir
from edge_agent.config import AgentSettings
from edge_agent.data import EVAL_DIR, RawData, fit_to_model, load_raw
from edge_agent.state import CACHE_DIR, STATE_FILE, PersistentState
from fedmq.bundle.bundle import Bundle
from fedmq.durable_files import TMP_SUFFIX
from fedmq.errors import BundleError, DataError, DecodeError
from fedmq.runtime.trainer import EVAL_BATCH, Trainer
from fedmq.wire.archive import unpack_files

log = logging.getLogger(__name__)

# Examples the initial model is evaluated on: enough for a meaningful loss, few enough
# that a check on a device with a large data set takes a second, not a training run.
MAX_EVAL_EXAMPLES = 1024
NO_BUNDLE_HINT = "no bundle to fit against yet: pass --bundle DIR"


@dataclass(frozen=True)
class FoundBundle:
    """A bundle to fit the data to, and where it came from (for the report)."""

    bundle: Bundle
    origin: str


Say = Callable[[str], None]  # takes one line of the report, as soon as it is known


def load_bundle_dir(directory: Path) -> FoundBundle:
    """The bundle in ``directory`` (``--bundle``).

    Raises:
        BundleError: not a bundle directory, or a damaged one.
    """
    return FoundBundle(Bundle.load(directory), str(directory))


def _answered_with(settings: AgentSettings, sha256: str) -> str:
    """How ``state.json`` relates to the cached bundle ``sha256``, for the report."""
    try:
        state = PersistentState.model_validate_json((settings.state_dir / STATE_FILE).read_bytes())
    except (OSError, ValidationError):
        return "no round answered with it yet"
    if state.federation != settings.federation or state.bundle != sha256:
        return "no round answered with it yet"
    return f"last used in round {state.last_answered_round} (state.json)"


def cached_bundle(settings: AgentSettings) -> tuple[FoundBundle | None, list[str]]:
    """The newest valid bundle archive in the agent's blob cache, if any.

    The cache holds bundle archives and parameter sets side by side, both named by
    sha256; reading a blob refreshes its time (LRU), so the newest archive is the bundle
    the agent last downloaded or trained.  A damaged blob is skipped, as the agent
    itself would download it again.

    Returns:
        The bundle (None: none cached) and warnings about blobs that were skipped.
    """
    directory = blob_dir(settings.state_dir / CACHE_DIR)
    try:
        paths = [p for p in directory.iterdir() if p.is_file() and not p.name.endswith(TMP_SUFFIX)]
    except OSError:  # no state directory, or no cache in it yet
        return None, []
    limit = settings.limits.max_blob_mb * 2**20
    warnings: list[str] = []
    for path in sorted(paths, key=_mtime, reverse=True):
        try:
            if path.stat().st_size > limit:
                continue  # a blob the agent would not accept either
            data = path.read_bytes()
        except OSError as exc:
            warnings.append(f"cannot read cached blob {path.name[:12]}…: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() != path.name:
            warnings.append(f"cached blob {path.name[:12]}… is damaged (sha256 differs)")
            continue
        try:
            files = {name: bytes(view) for name, view in unpack_files(data).items()}
        except DecodeError:
            continue  # a parameter set, not a bundle archive
        try:
            bundle = Bundle.from_files(files)
        except BundleError as exc:
            warnings.append(f"cached bundle {path.name[:12]}… is unusable: {exc}")
            continue
        origin = f"cached bundle {path.name[:12]}… ({_answered_with(settings, path.name)})"
        return FoundBundle(bundle, origin), warnings
    return None, warnings


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _shape(shape: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, shape))}]"


def _labels(shape: tuple[int, ...], dtype: object) -> str:
    # One number per example (class indices) reads better without an empty "[]".
    return f"labels {dtype}" if not shape else f"labels {_shape(shape)} {dtype}"


def _describe_raw(name: str, data: RawData) -> str:
    line = f"{name}: {data.x.shape[0]} examples, inputs {_shape(data.x.shape[1:])} {data.x.dtype}"
    y = data.y
    if y is None:
        return line + ", no labels"
    line += f", {_labels(y.shape[1:], y.dtype)}"
    if y.size and y.ndim == 1:
        line += f" in [{y.min():g}, {y.max():g}]"
    return line


def _evaluation_source(settings: AgentSettings, evaluation: RawData | None) -> str:
    data = settings.data
    if evaluation is None or evaluation.x.shape[0] == 0:
        return "none: no local evaluation metrics (data.eval_fraction, or an eval/ directory)"
    if data.path is not None and (data.path / EVAL_DIR).is_dir():
        return f"from {data.path / EVAL_DIR}"
    held_out = f"held out: data.eval_fraction {data.eval_fraction:g}, data.seed {data.seed}"
    if data.entry_point is not None:
        return f"returned by {data.entry_point}, or {held_out}"
    return held_out


def check_data(settings: AgentSettings, found: FoundBundle | None, say: Say) -> bool:
    """Load the configured data and, with a bundle, fit it and run the model once.

    Each finding goes to ``say`` as it is made, so what was found before a problem is
    reported too.

    Returns:
        True when the data was fitted to a bundle, False without a bundle.

    Raises:
        DataError: the data is missing, malformed or does not fit the bundle, or the
            model's output on it is not finite.
        TrainingError: onnxruntime refused the fitted data.
        ConfigError: the data entry point cannot be imported.
        BundleError: onnxruntime cannot load the bundle's graphs.
    """
    source = settings.data.path or settings.data.entry_point
    train, evaluation = load_raw(settings.data)
    say(_describe_raw(f"training data ({source})", train))
    if evaluation is not None and evaluation.x.shape[0]:
        say(_describe_raw("evaluation data", evaluation))
    say(f"evaluation split: {_evaluation_source(settings, evaluation)}")
    if found is None:
        return False
    manifest = found.bundle.manifest
    say(
        f"bundle: {manifest.name} from {found.origin}: input {_shape(manifest.input.example_shape)}"
        f" {manifest.input.dtype}, {_labels(manifest.label.example_shape, manifest.label.dtype)}"
        f", loss {manifest.loss}"
    )
    dataset = fit_to_model(train, evaluation, manifest, settings.data.target)
    say(
        f"fitted: {dataset.num_train} training and {dataset.num_eval} evaluation examples as "
        f"inputs {_shape(dataset.x_train.shape[1:])} {dataset.x_train.dtype}, "
        f"{_labels(dataset.y_train.shape[1:], dataset.y_train.dtype)}"
    )
    trainer = Trainer(found.bundle, threads=settings.threads)
    params = found.bundle.initial_parameters()
    output = trainer.predict(params, dataset.x_train[:EVAL_BATCH])
    if not np.isfinite(output).all():
        raise DataError(
            "the model's output on the training data is not finite with the bundle's "
            "initial parameters: are the inputs scaled as the model expects?"
        )
    say(
        f"forward pass (model.onnx, onnxruntime): {output.shape[0]} examples -> output "
        f"{_shape(output.shape)} {output.dtype}"
    )
    x, y, which = dataset.x_eval, dataset.y_eval, "evaluation"
    if dataset.num_eval == 0:
        x, y, which = dataset.x_train, dataset.y_train, "training"
    metrics = trainer.evaluate(params, x[:MAX_EVAL_EXAMPLES], y[:MAX_EVAL_EXAMPLES])
    if not all(math.isfinite(value) for value in metrics.values()):
        raise DataError(f"the initial model's {which} metrics are not finite: {metrics}")
    shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    say(
        f"initial model on {min(len(x), MAX_EVAL_EXAMPLES)} {which} examples: {shown} "
        "(the bundle's initial parameters, before any round)"
    )
    return True


def run_check(settings: AgentSettings, bundle_dir: Path | None, say: Say) -> None:
    """``fedmq-agent check`` past the configuration: find a bundle, then :func:`check_data`.

    Args:
        settings: the validated configuration.
        bundle_dir: ``--bundle`` (None: the newest bundle in the blob cache, if any).
        say: takes the report, line by line.

    Raises:
        BundleError: ``bundle_dir`` is not a usable bundle.
        DataError, TrainingError, ConfigError: as :func:`check_data`.
    """
    warnings: list[str] = []
    if bundle_dir is not None:
        found: FoundBundle | None = load_bundle_dir(bundle_dir)
    else:
        found, warnings = cached_bundle(settings)
    for warning in warnings:
        log.warning("%s", warning)
    if check_data(settings, found, say):
        assert found is not None
        say(f"ok: the local data fits bundle {found.bundle.manifest.name}")
    else:
        say(NO_BUNDLE_HINT)
