"""Local training and evaluation of a model bundle with onnxruntime and numpy.

``train_step.onnx`` computes the loss, the gradients and new buffer values for one
batch; everything else (shuffling, dropout masks, the FedProx term, clipping, the
optimizer, committing BatchNorm statistics) happens here in numpy.  Evaluation runs
``model.onnx`` with the caller's current parameters fed over its weight initializers.

A :class:`Trainer` holds only the two sessions and read-only bundle data: every call
keeps its state in locals, and onnxruntime sessions may run concurrently, so one
instance can serve several threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedmq.bundle.bundle import Bundle
from fedmq.bundle.manifest import (
    INPUT_NAME,
    LABEL_NAME,
    LOSS_NAME,
    OUTPUT_NAME,
    gradient_output_name,
    updated_buffer_output_name,
)
from fedmq.errors import TrainingCancelled, TrainingError
from fedmq.runtime.batching import batch_indices, steps_per_epoch
from fedmq.runtime.dropout import dropout_mask
from fedmq.runtime.flat import FlatTensors
from fedmq.runtime.metrics import correct_fraction, per_example_loss
from fedmq.runtime.optim import clip_by_global_norm, make_optimizer
from fedmq.runtime.session import check_io, open_session
from fedmq.wire.training import TrainingConfig

FloatArray = npt.NDArray[np.float32]
AnyArray = npt.NDArray[np.generic]
EVAL_BATCH = 256  # examples per model.onnx call: bounds activation memory on small devices
_NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64}


@dataclass(frozen=True)
class TrainResult:
    """What one local training run produced.

    Attributes:
        delta: new minus old value of each tensor in ``manifest.update_names``.
        num_examples: examples in the local training set (the FedAvg weight).
        metrics: ``train_loss`` (example-weighted mean over all steps), ``steps`` and
            ``examples_seen``.
    """

    delta: dict[str, FloatArray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Trains and evaluates one bundle's model on numpy data.

    Args:
        bundle: a validated bundle.
        threads: onnxruntime intra-op threads per call (1 keeps a core free for the
            agent's network loop on small devices).

    Raises:
        BundleError: onnxruntime cannot load a graph, or its inputs/outputs differ from
            what the manifest implies.
    """

    def __init__(self, bundle: Bundle, *, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.bundle = bundle
        self.manifest = manifest = bundle.manifest
        self._trainable = manifest.trainable_names
        self._updated = manifest.updated_buffer_names
        self._train_outputs = [
            LOSS_NAME,
            *(gradient_output_name(n) for n in self._trainable),
            *(updated_buffer_output_name(n) for n in self._updated),
        ]
        self._train_session = open_session(
            bundle.train_step_onnx, threads=threads, what="train_step.onnx"
        )
        check_io(
            self._train_session,
            [
                INPUT_NAME,
                LABEL_NAME,
                *(d.input_name for d in manifest.dropout),
                *manifest.tensor_names,
            ],
            self._train_outputs,
            "train_step.onnx",
        )
        self._model_session = open_session(bundle.model_onnx, threads=threads, what="model.onnx")
        check_io(
            self._model_session,
            [INPUT_NAME, *manifest.tensor_names],
            [OUTPUT_NAME],
            "model.onnx",
        )

    # -- validation -------------------------------------------------------------------

    def _state(self, params: Mapping[str, AnyArray]) -> dict[str, AnyArray]:
        specs = self.manifest.tensors
        missing = [s.name for s in specs if s.name not in params]
        extra = sorted(set(params) - {s.name for s in specs})
        if missing or extra:
            raise TrainingError(
                f"parameters do not fit bundle {self.manifest.name!r}: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        state: dict[str, AnyArray] = {}
        for spec in specs:
            value = np.asarray(params[spec.name])
            if value.shape != spec.shape:
                raise TrainingError(
                    f"parameter {spec.name!r} has shape {list(value.shape)}, the bundle "
                    f"expects {list(spec.shape)}"
                )
            state[spec.name] = np.require(value, dtype=_NUMPY_DTYPES[spec.dtype], requirements="C")
        return state

    def _data(self, x: AnyArray, y: AnyArray | None) -> tuple[AnyArray, AnyArray | None]:
        manifest = self.manifest
        x = np.require(x, dtype=_NUMPY_DTYPES[manifest.input.dtype], requirements="C")
        if x.ndim == 0 or x.shape[1:] != manifest.input.example_shape:
            raise TrainingError(
                f"inputs have shape {list(x.shape)}; bundle {manifest.name!r} expects "
                f"(n, {', '.join(map(str, manifest.input.example_shape))})"
            )
        if y is None:
            return x, None
        y = np.require(y, dtype=_NUMPY_DTYPES[manifest.label.dtype], requirements="C")
        if y.ndim == 0 or y.shape[0] != x.shape[0] or y.shape[1:] != manifest.label.example_shape:
            raise TrainingError(
                f"labels have shape {list(y.shape)}; expected ({x.shape[0]}"
                f"{''.join(f', {d}' for d in manifest.label.example_shape)}) for "
                f"{x.shape[0]} inputs and loss {manifest.loss}"
            )
        if manifest.loss == "cross_entropy" and y.size:
            classes = manifest.output.shape[1]
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= int(classes):
                raise TrainingError(f"class labels span [{low}, {high}]; the model has {classes}")
        return x, y

    # -- training ---------------------------------------------------------------------

    def train(
        self,
        params: Mapping[str, AnyArray],
        x: AnyArray,
        y: AnyArray,
        config: TrainingConfig,
        *,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Train locally from ``params`` and return the update.

        Per step: gradient of the mean batch loss, plus ``prox_mu * (w - w_start)``
        (FedProx), clipped to ``clip_grad_norm``, then the optimizer step (weight decay
        inside it, as in ``torch.optim``); BatchNorm running statistics take the values
        the step computed.  Frozen parameters never change.

        Args:
            params: every parameter and buffer of the bundle (as the aggregator sends).
            x: inputs, ``(n, *input example shape)``.
            y: labels, ``(n, *label example shape)`` (``y = x`` for an autoencoder).
            config: optimizer, epochs, batch size, seeds.
            progress: called as ``progress(steps_done, steps_total)`` after each step.
            should_stop: polled before each batch; when it returns true training stops.

        Returns:
            The delta of ``manifest.update_names``, the number of examples and metrics.

        Raises:
            TrainingCancelled: ``should_stop()`` returned true.
            TrainingError: bad parameters or data, a non-finite loss or gradient, or an
                onnxruntime failure.
        """
        state = self._state(params)
        x, labels = self._data(x, y)
        assert labels is not None
        count = int(x.shape[0])
        if count == 0:
            raise TrainingError("no training examples")
        specs = {s.name: s for s in self.manifest.tensors}
        weights = FlatTensors(self._trainable, [specs[n].shape for n in self._trainable])
        weights.load(state)
        start = weights.data.copy()
        grad = np.empty_like(weights.data)
        optimizer = make_optimizer(config, weights.size)
        feeds: dict[str, AnyArray] = {n: v for n, v in state.items() if n not in weights.views}
        feeds.update(weights.views)

        total = config.epochs * steps_per_epoch(count, config.batch_size)
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        order_rng = np.random.default_rng(config.seed)
        dropout_rng = np.random.default_rng(config.dropout_seed)
        trainable_count = len(self._trainable)
        loss_sum = 0.0
        seen = 0
        steps = 0
        for index in batch_indices(count, config.batch_size, config.epochs, order_rng):
            if steps >= total:
                break
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"training stopped by the caller after {steps} steps")
            feeds[INPUT_NAME] = x[index]
            feeds[LABEL_NAME] = labels[index]
            for spec in self.manifest.dropout:
                feeds[spec.input_name] = dropout_mask(spec, len(index), dropout_rng)
            try:
                outputs = self._train_session.run(self._train_outputs, feeds)
            except Exception as exc:  # onnxruntime's exception types are not public
                raise TrainingError(f"train step failed at step {steps}: {exc}") from exc
            loss = float(outputs[0])
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss} at step {steps}: training diverged (lower lr, or set "
                    "clip_grad_norm)"
                )
            weights.gather(outputs[1 : 1 + trainable_count], grad)
            if config.prox_mu:
                grad += np.float32(config.prox_mu) * (weights.data - start)
            if config.clip_grad_norm is not None:
                norm = clip_by_global_norm(grad, config.clip_grad_norm)
                if not math.isfinite(norm):
                    raise TrainingError(f"gradient norm is {norm} at step {steps}")
            optimizer.step(weights.data, grad)
            for name, value in zip(self._updated, outputs[1 + trainable_count :], strict=True):
                feeds[name] = value
            loss_sum += loss * len(index)
            seen += len(index)
            steps += 1
            if progress is not None:
                progress(steps, total)
        if not np.isfinite(weights.data).all():
            raise TrainingError("parameters became non-finite during training")

        delta: dict[str, FloatArray] = {}
        for name in self.manifest.update_names:
            new = weights.views[name] if name in weights.views else feeds[name]
            delta[name] = np.asarray(new, dtype=np.float32) - np.asarray(
                state[name], dtype=np.float32
            )
        metrics = {
            "train_loss": loss_sum / max(seen, 1),
            "steps": float(steps),
            "examples_seen": float(seen),
        }
        return TrainResult(delta=delta, num_examples=count, metrics=metrics)

    # -- inference --------------------------------------------------------------------

    def predict(
        self, params: Mapping[str, AnyArray], x: AnyArray, *, batch_size: int = EVAL_BATCH
    ) -> FloatArray:
        """Model outputs for ``x`` with the given parameters (``model.onnx``, eval mode).

        Raises:
            TrainingError: bad parameters or inputs, or an onnxruntime failure.
        """
        state = self._state(params)
        x, _ = self._data(x, None)
        if len(x) == 0:
            return np.zeros((0, *self.manifest.output.example_shape), dtype=np.float32)
        return np.concatenate(list(self._outputs(state, x, batch_size)), axis=0)

    def _outputs(
        self, state: dict[str, AnyArray], x: AnyArray, batch_size: int
    ) -> Iterator[FloatArray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        feeds = dict(state)
        for begin in range(0, len(x), batch_size):
            feeds[INPUT_NAME] = x[begin : begin + batch_size]
            try:
                (output,) = self._model_session.run([OUTPUT_NAME], feeds)
            except Exception as exc:  # onnxruntime's exception types are not public
                raise TrainingError(f"model.onnx failed: {exc}") from exc
            yield output

    def evaluate(
        self,
        params: Mapping[str, AnyArray],
        x: AnyArray,
        y: AnyArray,
        *,
        batch_size: int = EVAL_BATCH,
    ) -> dict[str, float]:
        """Evaluate ``params`` on labelled data.

        Returns:
            ``loss`` (the bundle's loss, example mean) plus ``accuracy`` for
            ``cross_entropy`` and ``bce_with_logits`` or ``mse`` and ``mae`` for
            regression losses.

        Raises:
            TrainingError: bad parameters or data, no examples, or an onnxruntime failure.
        """
        state = self._state(params)
        x, labels = self._data(x, y)
        assert labels is not None
        if len(x) == 0:
            raise TrainingError("no evaluation examples")
        loss_name = self.manifest.loss
        losses: list[npt.NDArray[np.float64]] = []
        scores: list[npt.NDArray[np.float64]] = []
        squared: list[npt.NDArray[np.float64]] = []
        absolute: list[npt.NDArray[np.float64]] = []
        for begin, output in zip(
            range(0, len(x), batch_size), self._outputs(state, x, batch_size), strict=True
        ):
            label = labels[begin : begin + batch_size]
            losses.append(per_example_loss(loss_name, output, label))
            if self.manifest.task == "regression":
                squared.append(per_example_loss("mse", output, label))
                absolute.append(per_example_loss("l1", output, label))
            else:
                scores.append(correct_fraction(loss_name, output, label))
        metrics = {"loss": float(np.concatenate(losses).mean())}
        if scores:
            metrics["accuracy"] = float(np.concatenate(scores).mean())
        else:
            metrics["mse"] = float(np.concatenate(squared).mean())
            metrics["mae"] = float(np.concatenate(absolute).mean())
        return metrics
