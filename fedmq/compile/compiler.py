"""Compile a PyTorch module and a loss into a model bundle.

The train step is ``torch.func.grad_and_value`` of "forward through the module with the
given state, then the loss", differentiated only with respect to trainable parameters.
Buffers the forward rewrites (BatchNorm running statistics) are cloned inside the step
and returned, so the graph stays free of input mutation and the device decides when to
commit them.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
import torch
from pydantic import ValidationError
from torch import nn
from torch.func import functional_call, grad_and_value

from fedmq.bundle.bundle import Bundle, sha256_hex
from fedmq.bundle.manifest import (
    BATCH,
    INPUT_NAME,
    LABEL_NAME,
    LOSS_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    PARAMETERS_FILE,
    RESERVED_NAMES,
    TRAIN_STEP_FILE,
    DropoutSpec,
    LossName,
    Manifest,
    StateTensor,
    TensorSpec,
    dropout_input_name,
    gradient_output_name,
    updated_buffer_output_name,
)
from fedmq.bundle.parameters import write_parameters
from fedmq.bundle.source import OnnxSource
from fedmq.compile.dropout import DropoutLayer, find_dropout, masked_dropout, reject_random_ops
from fedmq.compile.export import export_inference, export_train_step, tracing_context
from fedmq.compile.finalize import IR_VERSION, OPSET, finalize
from fedmq.compile.losses import LOSSES
from fedmq.errors import CompileError

EXAMPLE_BATCH = 3  # examples traced with; any size > 1 works once duck shaping is off
InputDtype = Literal["float32", "int64"]
BatchNormMode = Literal["train", "eval"]

_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "int64": torch.int64}


@dataclass(frozen=True)
class _State:
    """The module's parameters and buffers as the graphs take them."""

    specs: tuple[StateTensor, ...]
    values: dict[str, torch.Tensor]

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def trainable(self) -> list[str]:
        return [spec.name for spec in self.specs if spec.trainable]

    @property
    def updated(self) -> list[str]:
        return [spec.name for spec in self.specs if spec.updated]


def select_trainable(
    parameters: dict[str, nn.Parameter],
    patterns: Sequence[str] | None,
    aliases: dict[str, str] | None = None,
) -> set[str]:
    """Parameters whose name (or original ONNX initializer name, ``aliases``) matches."""
    candidates = {name for name, p in parameters.items() if p.requires_grad}
    if patterns is None:
        return candidates
    aliases = aliases or {}

    def matches(name: str) -> bool:
        names = (name, aliases[name]) if name in aliases else (name,)
        return any(fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns)

    chosen = {n for n in candidates if matches(n)}
    if not chosen:
        listed = [f"{n} ({aliases[n]})" if n in aliases else n for n in sorted(parameters)]
        raise CompileError(
            f"--trainable {list(patterns)} matches no parameter; parameters are "
            f"{listed[:20]} (fedmq compile --list-params prints them all)"
        )
    return chosen


def _check_batchnorm(model: nn.Module) -> bool:
    found = False
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            found = True
            if module.track_running_stats and module.momentum is None:
                raise CompileError(
                    f"BatchNorm {name!r} has momentum=None (cumulative average), which "
                    "depends on the step count at trace time; give it a numeric momentum"
                )
    return found


def _changed_buffers(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Buffers a train-mode forward pass rewrites (found by running one on a copy)."""
    probe = copy.deepcopy(model)
    before = {name: b.detach().clone() for name, b in probe.named_buffers()}
    with torch.no_grad():
        probe(example)
    return {
        name
        for name, buffer in probe.named_buffers()
        if not torch.equal(buffer.detach(), before[name])
    }


def _collect_state(model: nn.Module, trainable: set[str], updated: set[str]) -> _State:
    specs: list[StateTensor] = []
    values: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        if parameter.dtype != torch.float32:
            raise CompileError(
                f"parameter {name!r} is {parameter.dtype}; fedmq trains float32 "
                "(call model.float() in the factory)"
            )
        values[name] = parameter.detach().clone()
        specs.append(
            StateTensor(
                name=name,
                shape=tuple(parameter.shape),
                dtype="float32",
                kind="parameter",
                trainable=name in trainable,
            )
        )
    for name, buffer in model.named_buffers():
        dtype = {torch.float32: "float32", torch.int64: "int64"}.get(buffer.dtype)
        if dtype is None:
            raise CompileError(
                f"buffer {name!r} is {buffer.dtype}; only float32 and int64 are supported"
            )
        values[name] = buffer.detach().clone()
        specs.append(
            StateTensor(
                name=name,
                shape=tuple(buffer.shape),
                dtype=dtype,
                kind="buffer",
                trainable=False,
                updated=name in updated,
            )
        )
    for spec in specs:
        if spec.name in RESERVED_NAMES:
            raise CompileError(f"state tensor {spec.name!r} collides with a reserved graph name")
    return _State(specs=tuple(specs), values=values)


def _example_input(shape: Sequence[int], dtype: InputDtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == "int64":
        return torch.zeros((EXAMPLE_BATCH, *shape), dtype=torch.int64)
    return torch.randn((EXAMPLE_BATCH, *shape), generator=generator)


def _example_label(loss: LossName, output: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if loss == "cross_entropy":
        if output.dim() < 2:
            raise CompileError(
                f"cross_entropy needs an output of shape (batch, classes, ...); the model "
                f"returns {list(output.shape)}"
            )
        classes = output.shape[1]
        return torch.randint(0, classes, (output.shape[0], *output.shape[2:]), generator=generator)
    if loss == "bce_with_logits":
        return torch.randint(0, 2, output.shape, generator=generator).to(torch.float32)
    return torch.randn(output.shape, generator=generator)


def _spec(tensor: torch.Tensor) -> TensorSpec:
    dtype = {torch.float32: "float32", torch.int64: "int64"}.get(tensor.dtype)
    if dtype is None:
        raise CompileError(f"graph tensors must be float32 or int64, not {tensor.dtype}")
    return TensorSpec(shape=(BATCH, *tensor.shape[1:]), dtype=dtype)


class _Inference(nn.Module):
    """``forward(x, *state)`` through the model with the state passed in.

    The model is kept out of the registered submodules so ``torch.export`` does not
    lift its own parameters as constants next to the inputs.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self._model = [model]
        self._names = list(names)

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        state_dict = dict(zip(self._names, state, strict=True))
        output: torch.Tensor = functional_call(self._model[0], state_dict, (x,))
        return output


def _check_io(
    model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str], what: str
) -> None:
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != list(inputs) or got_out != list(outputs):
        raise CompileError(
            f"{what}: exported graph inputs/outputs differ from the manifest "
            f"(inputs {got_in[:6]}..., outputs {got_out[:6]}...)"
        )


def _train_step_graph(
    model: nn.Module,
    state: _State,
    dropout: list[DropoutLayer],
    loss: LossName,
    x: torch.Tensor,
    y: torch.Tensor,
) -> bytes:
    loss_fn = LOSSES[loss]
    names = state.names
    trainable = state.trainable
    updated = state.updated
    drop_names = [layer.module for layer in dropout]

    def step(x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        masks = dict(zip(drop_names, rest[: len(drop_names)], strict=True))
        tensors = dict(zip(names, rest[len(drop_names) :], strict=True))
        fixed = {n: t for n, t in tensors.items() if n not in trainable}

        def objective(
            params: dict[str, torch.Tensor],
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            # Fresh copies take the forward's in-place buffer updates; they are returned.
            buffers = {n: fixed[n].clone() for n in updated}
            with masked_dropout(model, masks):
                output = functional_call(model, {**fixed, **buffers, **params}, (x,))
            return loss_fn(output, y), tuple(buffers[n] for n in updated)

        grads, (value, new_buffers) = grad_and_value(objective, has_aux=True)(
            {n: tensors[n] for n in trainable}
        )
        return (value, *(grads[n] for n in trainable), *new_buffers)

    masks = [torch.ones(layer.mask_shape) for layer in dropout]
    args = [x, y, *masks, *(state.values[n] for n in names)]
    batched = [True, True, *([True] * len(masks)), *([False] * len(names))]
    inputs = [INPUT_NAME, LABEL_NAME, *(dropout_input_name(n) for n in drop_names), *names]
    outputs = [
        LOSS_NAME,
        *(gradient_output_name(n) for n in trainable),
        *(updated_buffer_output_name(n) for n in updated),
    ]
    proto = export_train_step(step, args, batched, inputs, outputs, OPSET)
    _check_io(proto, inputs, outputs, "train step")
    return finalize(proto, batched_inputs=2 + len(masks))


def _model_graph(model: nn.Module, state: _State, x: torch.Tensor) -> bytes:
    names = state.names
    wrapper = _Inference(model, names)
    inputs = [INPUT_NAME, *names]
    values = [state.values[n] for n in names]
    proto = export_inference(wrapper, x, values, inputs, [OUTPUT_NAME], OPSET)
    _check_io(proto, inputs, [OUTPUT_NAME], "model")
    defaults = {n: state.values[n].numpy() for n in names}
    return finalize(proto, batched_inputs=1, defaults=defaults)


def compile_module(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    loss: LossName,
    name: str = "model",
    input_dtype: InputDtype = "float32",
    trainable: Sequence[str] | None = None,
    batchnorm: BatchNormMode = "train",
    source: OnnxSource | None = None,
) -> Bundle:
    """Compile ``model`` and ``loss`` into a model bundle.

    Args:
        model: the module; it is copied, never modified.  Parameters must be float32.
        input_shape: shape of one example (without the batch dimension).
        loss: the training loss (mean over the batch).
        name: the bundle's name in its manifest.
        input_dtype: dtype of the model input.
        trainable: ``fnmatch`` patterns of parameter names to train; the others are
            frozen (no gradient is computed or sent).  ``None`` trains every parameter
            with ``requires_grad``.
        batchnorm: ``"train"`` normalises with batch statistics and updates the running
            statistics; ``"eval"`` uses (and never changes) the running statistics,
            as usual when fine-tuning on small local batches.
        source: for a model imported from ONNX (:func:`~fedmq.compile.onnx_import.
            import_onnx`), the file's interface: recorded in the manifest so the export
            restores it, and ``trainable`` patterns also match original initializer names.

    Returns:
        The validated bundle (write it with :meth:`Bundle.write`).

    Raises:
        UnsupportedOperatorError: an operator or layer has no train-step translation.
        CompileError: the model, loss or input spec cannot be compiled.
    """
    if loss not in LOSSES:
        raise CompileError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
    model = copy.deepcopy(model)
    has_batchnorm = _check_batchnorm(model)
    x = _example_input(input_shape, input_dtype)
    aliases = source.original_names() if source is not None else None
    trainable_names = select_trainable(dict(model.named_parameters()), trainable, aliases)
    if source is not None and source.input.dtype != input_dtype:
        raise CompileError(
            f"--input-dtype {input_dtype} differs from the ONNX input "
            f"{source.input.name!r} ({source.input.dtype})"
        )
    _collect_state(model, trainable_names, set())  # dtype checks before running anything

    model.train()
    if batchnorm == "eval":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    inference = copy.deepcopy(model).eval()
    try:
        with tracing_context():
            # The probes run train-mode forwards on copies, so the running statistics
            # the bundle starts from stay those of the given model.
            dropout = find_dropout(copy.deepcopy(model), x)
            reject_random_ops(copy.deepcopy(model), x, dropout)
            updated = _changed_buffers(model, x)
            with torch.no_grad():
                output = inference(x)
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(
            f"the model failed on an example input of shape {[EXAMPLE_BATCH, *input_shape]} "
            f"({input_dtype}): {type(exc).__name__}: {exc}"
        ) from exc
    state = _collect_state(model, trainable_names, updated)
    if not isinstance(output, torch.Tensor) or output.dtype != torch.float32:
        raise CompileError("the model must return one float32 tensor")
    if output.dim() == 0 or output.shape[0] != EXAMPLE_BATCH:
        raise CompileError(f"the model output {list(output.shape)} has no batch dimension")
    y = _example_label(loss, output)

    train_step = _train_step_graph(model, state, dropout, loss, x, y)
    model_graph = _model_graph(inference, state, x)
    initial = {n: state.values[n].numpy() for n in state.names}
    parameters = write_parameters(initial)

    manifest = _manifest(
        name=name,
        opset=OPSET,
        ir_version=IR_VERSION,
        loss=loss,
        input=_spec(x),
        label=_spec(y),
        output=_spec(output),
        tensors=state.specs,
        dropout=tuple(
            DropoutSpec(
                module=layer.module,
                p=layer.p,
                shape=TensorSpec(shape=(BATCH, *layer.mask_shape[1:]), dtype="float32"),
            )
            for layer in dropout
        ),
        batchnorm=batchnorm if has_batchnorm else "none",
        source=source,
        files={
            TRAIN_STEP_FILE: sha256_hex(train_step),
            MODEL_FILE: sha256_hex(model_graph),
            PARAMETERS_FILE: sha256_hex(parameters),
        },
    )
    return Bundle.from_files(
        {
            MANIFEST_FILE: manifest.to_json(),
            TRAIN_STEP_FILE: train_step,
            MODEL_FILE: model_graph,
            PARAMETERS_FILE: parameters,
        }
    )


def _manifest(**fields: Any) -> Manifest:
    try:
        return Manifest(**fields)
    except ValidationError as exc:
        # Only the ONNX source can disagree with what was compiled (e.g. its declared
        # output shape); everything else was built here to fit.
        raise CompileError(f"the compiled model does not fit its manifest: {exc}") from exc


def initial_state(model: nn.Module) -> dict[str, npt.NDArray[np.generic]]:
    """The module's parameters and buffers as numpy arrays (state-dict names)."""
    return {
        name: tensor.detach().cpu().numpy().copy()
        for name, tensor in (*model.named_parameters(), *model.named_buffers())
    }
