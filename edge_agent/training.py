"""One round's local work, run on a worker thread: load, evaluate, train, encode, commit.

Before training, the global model as received is evaluated on the local evaluation
split (federated evaluation: ``global_eval_*`` metrics beside the training metrics).  An
evaluate-only round (announcement ``task = "evaluate"``) stops there and commits an
evaluation report (an update without tensors) instead of a delta.

onnxruntime calls block for as long as a training run takes, so none of this touches the
event loop.  The thread gets plain values and returns plain values; the only shared
state is the cancel flag it polls between batches and the status board it writes
progress to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from edge_agent.config import DataConfig
from edge_agent.data import Dataset, fit_to_model, load_raw
from edge_agent.outbox import OutboxEntry
from edge_agent.state import StateDir
from edge_agent.update import BuiltUpdate, build_report, build_update, local_training_config
from fedmq.bundle.bundle import Bundle
from fedmq.errors import BundleError, DataError, DecodeError, TrainingCancelled, TrainingError
from fedmq.runtime.trainer import Trainer
from fedmq.wire.archive import unpack_files
from fedmq.wire.control import RoundAnnouncement
from fedmq.wire.limits import DecodeLimits
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import decode_tensors
from fedmq.wire.update import GLOBAL_EVAL_EXAMPLES, GLOBAL_METRIC_PREFIX

log = logging.getLogger(__name__)

T = TypeVar("T")
Array = npt.NDArray[Any]


class ModelCache:
    """The trainer of the most recent bundle: building onnxruntime sessions takes time."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._sha: str | None = None
        self._trainer: Trainer | None = None
        self._lock = threading.Lock()

    def trainer(self, sha256: str, archive: bytes | bytearray) -> Trainer:
        """The trainer for bundle ``sha256`` (building it from ``archive`` if new).

        Raises:
            BundleError: the archive is not a valid bundle or onnxruntime rejects it.
        """
        with self._lock:
            if self._sha == sha256 and self._trainer is not None:
                return self._trainer
            try:
                files = {name: bytes(view) for name, view in unpack_files(archive).items()}
            except DecodeError as exc:
                raise BundleError(f"bundle blob is not a valid archive: {exc}") from exc
            trainer = Trainer(Bundle.from_files(files), threads=self._threads)
            self._sha, self._trainer = sha256, trainer
            return trainer


@dataclass(frozen=True)
class RoundInputs:
    """Everything the worker thread needs for one round."""

    announcement: RoundAnnouncement
    client: str
    bundle_blob: bytearray
    params_blob: bytearray
    data: DataConfig
    limits: DecodeLimits


@dataclass(frozen=True)
class RoundOutput:
    """A committed update and what it reports."""

    entry: OutboxEntry
    update: BuiltUpdate
    seconds: float


def train_and_commit(
    inputs: RoundInputs,
    models: ModelCache,
    state: StateDir,
    *,
    progress: Callable[[int, int], None],
    should_stop: Callable[[], bool],
) -> RoundOutput:
    """Train on local data, encode the delta and commit it to the outbox (blocking).

    In an evaluate-only round: evaluate the global model and commit the report instead.

    Raises:
        TrainingCancelled: ``should_stop`` became true before the commit.
        TrainingError: data, bundle, parameters or training failed (including DataError).
        BundleError: the bundle cannot be loaded.
        OSError: the state directory refused the commit.
    """
    started = time.monotonic()
    announcement = inputs.announcement
    trainer = models.trainer(announcement.bundle.sha256, inputs.bundle_blob)
    manifest = trainer.manifest
    try:
        params = decode_tensors(inputs.params_blob, inputs.limits)
    except DecodeError as exc:
        raise TrainingError(f"global parameters blob does not decode: {exc}") from exc
    train, evaluation = load_raw(inputs.data)
    dataset = fit_to_model(train, evaluation, manifest, inputs.data.target)
    evaluate_only = announcement.task == "evaluate"
    # Federated evaluation: the global model as received, on the local evaluation split.
    received = _evaluate_received(trainer, params, dataset, required=evaluate_only)
    codec = CodecSpec.parse(announcement.codec)
    bundle_sha = announcement.bundle.sha256
    expected = {
        name: (manifest.tensor(name).shape, np.dtype(np.float32)) for name in manifest.update_names
    }
    residual = state.residuals.load(bundle_sha, expected) if codec.lossy else {}
    if evaluate_only:
        progress(1, 1)
        if should_stop():
            raise TrainingCancelled("stopped before the report was committed")
        built = build_report(
            residual=residual,  # kept for the next training round: nothing was encoded
            federation=announcement.federation,
            client=inputs.client,
            round_id=announcement.round,
            num_examples=dataset.num_eval,
            metrics=received,
            chunk_size=announcement.chunk_size,
        )
    else:
        config = local_training_config(announcement.training, inputs.client, announcement.round)
        result = trainer.train(
            params,
            dataset.x_train,
            dataset.y_train,
            config,
            progress=progress,
            should_stop=should_stop,
        )
        metrics = {
            "train_loss": result.metrics["train_loss"],
            "num_batches": result.metrics["steps"],
        }
        metrics.update(received)
        metrics.update(_evaluate(trainer, params, result.delta, dataset))
        if should_stop():
            raise TrainingCancelled("stopped before the update was committed")
        built = build_update(
            delta=result.delta,
            residual=residual,
            manifest=manifest,
            codec=codec,
            federation=announcement.federation,
            client=inputs.client,
            round_id=announcement.round,
            num_examples=result.num_examples,
            metrics=metrics,
            chunk_size=announcement.chunk_size,
        )
    entry = OutboxEntry(
        update_id=built.meta.update_id,
        federation=announcement.federation,
        client=inputs.client,
        round=announcement.round,
        created_at=built.meta.created_at,
        sha256=built.ref.sha256,
        size=built.ref.size,
        chunk_size=built.ref.chunk_size,
        bundle=bundle_sha,
        deadline=announcement.deadline,
        paced=announcement.upload_slots is not None,
    )
    state.commit_update(entry, built.data, built.residual)
    return RoundOutput(entry, built, time.monotonic() - started)


def _evaluate_received(
    trainer: Trainer, params: dict[str, Array], dataset: Dataset, *, required: bool
) -> dict[str, float]:
    """The global model as received, on the evaluation split: ``global_eval_*`` metrics.

    One pass of ``model.onnx`` over the evaluation examples, as the evaluation after
    training makes.  ``required`` (an evaluate-only round): without evaluation data, or
    when the evaluation fails, the round fails (and is declined) instead.

    Raises:
        DataError: ``required`` and there is no evaluation data.
        TrainingError: ``required`` and the evaluation failed.
    """
    if dataset.num_eval == 0:
        if required:
            raise DataError(
                "an evaluate-only round needs evaluation data: add an eval/ directory, or "
                "set data.eval_fraction above 0"
            )
        return {}
    try:
        metrics = trainer.evaluate(params, dataset.x_eval, dataset.y_eval)
    except TrainingError as exc:
        if required:
            raise
        log.warning("evaluation of the global model failed: %s", exc)
        return {}
    figures = {f"{GLOBAL_METRIC_PREFIX}eval_{name}": value for name, value in metrics.items()}
    figures[GLOBAL_EVAL_EXAMPLES] = float(dataset.num_eval)
    return figures


def _evaluate(
    trainer: Trainer, params: dict[str, Array], delta: dict[str, Array], dataset: Dataset
) -> dict[str, float]:
    if dataset.num_eval == 0:
        return {}
    trained = {
        name: (value + delta[name]) if name in delta else value for name, value in params.items()
    }
    try:
        metrics = trainer.evaluate(trained, dataset.x_eval, dataset.y_eval)
    except TrainingError as exc:
        log.warning("local evaluation failed: %s", exc)
        return {}
    return {f"eval_{name}": value for name, value in metrics.items()}


async def run_in_thread(function: Callable[[], T], name: str) -> T:
    """Run ``function`` on a new daemon thread and await its result.

    Not ``asyncio.to_thread``: executor threads are joined at interpreter exit, so a
    training run that ignores its cancel flag would hold up shutdown; a daemon thread
    cannot.  Cancelling the awaiting task does not stop the thread: set its cancel flag.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = function()
        except BaseException as exc:  # handed to the awaiting task, not swallowed
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        # RuntimeError: the loop closed while we worked, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return await future
