"""The bundle manifest: what the graphs of a model bundle expect and produce.

The manifest is the contract between ``fedmq compile`` (which writes it), the device
runtime (which trains with it) and the aggregator (which needs the names an update
carries).  Graph input/output names follow fixed conventions derived from tensor names,
so the manifest does not repeat them:

* train step inputs: ``input``, ``label``, one ``dropout/<module>`` mask per dropout
  layer, then every tensor in :attr:`Manifest.tensors` under its own name;
* train step outputs: ``loss``, ``grad/<name>`` per trainable parameter,
  ``updated/<name>`` per buffer the step rewrites (BatchNorm running statistics);
* model inputs: ``input`` then every tensor; model output: ``output``.

PyTorch state names never contain ``/``, so the prefixes cannot collide with them.

A model compiled from an ONNX file also records that file's interface in ``source``
(:mod:`fedmq.bundle.source`), which ``fedmq export`` restores; the field is optional
and left out of ``manifest.json`` when absent, so older bundles read and hash as before.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmq.bundle.source import OnnxSource, SourceValue
from fedmq.errors import BundleError

FORMAT: Final = "fedmq-bundle"
FORMAT_VERSION: Final = 1
BATCH = "batch"  # name of the dynamic leading dimension of every graph input/output

INPUT_NAME = "input"
LABEL_NAME = "label"
OUTPUT_NAME = "output"
LOSS_NAME = "loss"
_GRAD_PREFIX = "grad/"
_UPDATED_PREFIX = "updated/"
_DROPOUT_PREFIX = "dropout/"
RESERVED_NAMES = frozenset({INPUT_NAME, LABEL_NAME, OUTPUT_NAME, LOSS_NAME})

MANIFEST_FILE = "manifest.json"
TRAIN_STEP_FILE = "train_step.onnx"
MODEL_FILE = "model.onnx"
PARAMETERS_FILE = "parameters.npz"
HASHED_FILES = (TRAIN_STEP_FILE, MODEL_FILE, PARAMETERS_FILE)

MAX_TENSORS = 100_000  # state tensors per bundle; far above any edge model, bounds parsing
MAX_RANK = 8  # ONNX runtimes handle more, but no layer fedmq compiles needs it
MAX_NAME_LENGTH = 512  # characters; deep module paths stay well under this

LossName = Literal["cross_entropy", "mse", "bce_with_logits", "l1"]
Dtype = Literal["float32", "int64"]
Task = Literal["classification", "binary", "regression"]

# A tensor name: a PyTorch state-dict key (dots and identifier characters).  Colons,
# slashes and whitespace are excluded so the graph prefixes above stay unambiguous.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Dim = Annotated[int, Field(ge=1, le=2**31 - 1)]


def gradient_output_name(tensor: str) -> str:
    """Name of the train-step output carrying the gradient of ``tensor``."""
    return f"{_GRAD_PREFIX}{tensor}"


def updated_buffer_output_name(tensor: str) -> str:
    """Name of the train-step output carrying the new value of buffer ``tensor``."""
    return f"{_UPDATED_PREFIX}{tensor}"


def dropout_input_name(module: str) -> str:
    """Name of the train-step input carrying the dropout mask of ``module``."""
    return f"{_DROPOUT_PREFIX}{module}"


def _check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"tensor name {name[:80]!r} must match {_NAME_RE.pattern} "
            f"and be at most {MAX_NAME_LENGTH} characters"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"tensor name {name!r} is reserved for a graph input/output")
    return name


class TensorSpec(BaseModel):
    """A batched graph input or output: the first dimension is always ``"batch"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[Literal["batch"] | Dim, ...] = Field(max_length=MAX_RANK)
    dtype: Dtype

    @field_validator("shape")
    @classmethod
    def _batch_first(
        cls, shape: tuple[Literal["batch"] | int, ...]
    ) -> tuple[Literal["batch"] | int, ...]:
        if not shape or shape[0] != BATCH or BATCH in shape[1:]:
            raise ValueError(f"shape {list(shape)} must start with {BATCH!r} and use it once")
        return shape

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example (every dimension after the batch)."""
        return tuple(int(d) for d in self.shape[1:])


class StateTensor(BaseModel):
    """A parameter or buffer of the model, in the order the graphs take them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: tuple[Annotated[int, Field(ge=0, le=2**31 - 1)], ...] = Field(max_length=MAX_RANK)
    dtype: Dtype
    kind: Literal["parameter", "buffer"]
    trainable: bool = Field(description="the train step emits a gradient for it")
    updated: bool = Field(False, description="the train step emits a new value for it")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return _check_name(name)

    @model_validator(mode="after")
    def _consistent(self) -> StateTensor:
        if self.kind == "parameter" and self.dtype != "float32":
            raise ValueError(f"parameter {self.name!r} must be float32, not {self.dtype}")
        if self.trainable and self.kind != "parameter":
            raise ValueError(f"buffer {self.name!r} cannot be trainable")
        if self.updated and self.kind != "buffer":
            raise ValueError(f"parameter {self.name!r} cannot be 'updated' (only buffers are)")
        return self

    @property
    def size(self) -> int:
        """Number of elements."""
        size = 1
        for dim in self.shape:
            size *= dim
        return size


class DropoutSpec(BaseModel):
    """One dropout layer whose keep-mask the device draws and feeds to the train step.

    The mask holds ``0`` (dropped) or ``1 / (1 - p)`` (kept, rescaled) and broadcasts
    against the layer's input: channel-wise dropout has size-1 spatial dimensions.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    module: str
    p: float = Field(ge=0.0, lt=1.0)
    shape: TensorSpec

    @field_validator("module")
    @classmethod
    def _valid_module(cls, module: str) -> str:
        return _check_name(module)

    @field_validator("shape")
    @classmethod
    def _float_mask(cls, shape: TensorSpec) -> TensorSpec:
        if shape.dtype != "float32":
            raise ValueError("dropout masks are float32")
        return shape

    @property
    def input_name(self) -> str:
        """Name of the train-step input that takes this mask."""
        return dropout_input_name(self.module)


def _check_source_value(value: SourceValue, spec: TensorSpec, what: str) -> None:
    """The original file's input/output agrees with the compiled graph's."""
    if value.dtype != spec.dtype:
        raise ValueError(f"source {what} {value.name!r} is {value.dtype}, the model's {spec.dtype}")
    if value.shape is None:
        return
    if len(value.shape) != len(spec.shape):
        raise ValueError(
            f"source {what} {value.name!r} has rank {len(value.shape)}, the model's "
            f"{len(spec.shape)}"
        )
    for declared, compiled in zip(value.shape[1:], spec.shape[1:], strict=True):
        if isinstance(declared, int) and declared != compiled:
            raise ValueError(
                f"source {what} {value.name!r} declares shape {list(value.shape)}, "
                f"the model's is {list(spec.shape)}"
            )


class Manifest(BaseModel):
    """Everything the device runtime and the aggregator need to know about a bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedmq-bundle"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    opset: int = Field(ge=7, le=100, description="ONNX default-domain opset of both graphs")
    ir_version: int = Field(ge=3, le=100, description="ONNX IR version of both graphs")
    loss: LossName
    input: TensorSpec
    label: TensorSpec
    output: TensorSpec
    tensors: tuple[StateTensor, ...] = Field(max_length=MAX_TENSORS)
    dropout: tuple[DropoutSpec, ...] = ()
    batchnorm: Literal["train", "eval", "none"] = Field(
        "none", description="mode BatchNorm layers were compiled in ('none': model has none)"
    )
    files: dict[str, Sha256] = Field(description="sha256 of each hashed bundle file")
    # Optional, and left out of manifest.json when absent, so bundles compiled before it
    # existed load (and hash) as they did, and export as `input`/`output`.
    source: OnnxSource | None = Field(
        None, description="interface of the ONNX file compiled from; the export restores it"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        counts = Counter(t.name for t in self.tensors)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"duplicate tensor names: {duplicates[:5]}")
        modules = [d.module for d in self.dropout]
        if len(set(modules)) != len(modules):
            raise ValueError("duplicate dropout modules")
        if set(self.files) != set(HASHED_FILES):
            raise ValueError(
                f"files must list exactly {list(HASHED_FILES)}, got {sorted(self.files)}"
            )
        if self.loss == "cross_entropy":
            if self.label.dtype != "int64":
                raise ValueError("cross_entropy labels are int64 class indices")
            if len(self.output.shape) < 2 or self.label.shape != (BATCH, *self.output.shape[2:]):
                raise ValueError(
                    f"cross_entropy needs output (batch, classes, ...) and label (batch, ...); "
                    f"got {list(self.output.shape)} and {list(self.label.shape)}"
                )
        else:
            if self.label.dtype != "float32":
                raise ValueError(f"{self.loss} labels are float32")
            if self.label.shape != self.output.shape:
                raise ValueError(
                    f"{self.loss} needs label shape == output shape; "
                    f"got {list(self.label.shape)} and {list(self.output.shape)}"
                )
        if self.output.dtype != "float32":
            raise ValueError("the model output must be float32")
        if not any(t.trainable for t in self.tensors):
            raise ValueError("no trainable parameter: nothing to train")
        if self.source is not None:
            self._check_source(self.source)
        return self

    def _check_source(self, source: OnnxSource) -> None:
        shapes = {t.name: t.shape for t in self.tensors}
        for initializer in source.initializers:
            shape = shapes.get(initializer.tensor)
            if shape is None:
                raise ValueError(f"source initializer of unknown tensor {initializer.tensor!r}")
            if initializer.transpose and len(shape) != 2:
                raise ValueError(f"{initializer.tensor!r} is not 2-d and cannot be transposed")
        for value, spec, what in (
            (source.input, self.input, "input"),
            (source.output, self.output, "output"),
        ):
            _check_source_value(value, spec, what)

    @property
    def task(self) -> Task:
        """What the loss implies for evaluation metrics."""
        if self.loss == "cross_entropy":
            return "classification"
        if self.loss == "bce_with_logits":
            return "binary"
        return "regression"

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every parameter and buffer, in graph input order."""
        return tuple(t.name for t in self.tensors)

    @property
    def trainable_names(self) -> tuple[str, ...]:
        """Parameters the train step emits gradients for, in graph order."""
        return tuple(t.name for t in self.tensors if t.trainable)

    @property
    def updated_buffer_names(self) -> tuple[str, ...]:
        """Buffers the train step rewrites (e.g. BatchNorm running statistics)."""
        return tuple(t.name for t in self.tensors if t.updated)

    @property
    def update_names(self) -> tuple[str, ...]:
        """Ordered tensor names an update carries.

        Trainable parameters plus the floating-point buffers the train step rewrites
        (BatchNorm running mean/var in train mode).  Integer buffers
        (``num_batches_tracked``), frozen parameters and buffers that never change
        are not sent: their delta is always zero.
        """
        return tuple(
            t.name for t in self.tensors if t.trainable or (t.updated and t.dtype == "float32")
        )

    def tensor(self, name: str) -> StateTensor:
        """The state tensor called ``name``.

        Raises:
            KeyError: no such tensor.
        """
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_json(self) -> bytes:
        """Serialise deterministically (stable key order, two-space indent, final newline).

        ``None`` fields (optional sections such as ``source``) are left out.
        """
        return (
            json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse and validate ``manifest.json``.

        Raises:
            BundleError: not JSON, or not a valid manifest (the message names the field).
        """
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"manifest.json is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise BundleError("manifest.json must hold a JSON object")
        if raw.get("format") != FORMAT:
            raise BundleError(f"manifest.json is not a {FORMAT} manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {raw.get('format_version')!r} is not supported "
                f"(this fedmq reads version {FORMAT_VERSION}); recompile the model"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise BundleError(f"invalid manifest.json: {exc}") from exc
