"""``fedmq compile``: a PyTorch model factory or an ONNX file to a model bundle.

The command imports :mod:`fedmq.compile` (and so torch) only when it runs, so ``fedmq
--help`` and the other commands work without the ``compile`` extra.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedmq import exit_codes
from fedmq.errors import CompileError


class Loss(StrEnum):
    """Training losses (mean over the batch)."""

    cross_entropy = "cross_entropy"
    mse = "mse"
    bce_with_logits = "bce_with_logits"
    l1 = "l1"


class BatchNorm(StrEnum):
    """How BatchNorm layers behave in the train step."""

    train = "train"
    eval = "eval"


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError as exc:
        raise CompileError(f"--input-shape {text!r}: expected integers such as 1,28,28") from exc
    if not shape or any(d < 1 for d in shape):
        raise CompileError(f"--input-shape {text!r}: expected positive integers such as 1,28,28")
    return shape


def compile_command(
    source: Annotated[
        str,
        typer.Argument(help="model factory (package.module:function, file.py:function) or .onnx"),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="bundle directory to write (required unless --list-params)"
        ),
    ] = None,
    loss: Annotated[Loss, typer.Option(help="training loss")] = Loss.cross_entropy,
    input_shape: Annotated[
        str | None,
        typer.Option(help="shape of one example, e.g. 1,28,28 (read from the graph for .onnx)"),
    ] = None,
    input_dtype: Annotated[str, typer.Option(help="float32 or int64")] = "float32",
    trainable: Annotated[
        list[str] | None,
        typer.Option(help="glob of parameter names to train (repeatable); others are frozen"),
    ] = None,
    batchnorm: Annotated[
        BatchNorm, typer.Option(help="train: batch statistics; eval: frozen running statistics")
    ] = BatchNorm.train,
    name: Annotated[
        str | None, typer.Option(help="bundle name (default: output directory name)")
    ] = None,
    seed: Annotated[int, typer.Option(help="torch seed set before calling the factory")] = 0,
    list_params: Annotated[
        bool,
        typer.Option(
            "--list-params",
            help="print the parameter/buffer names --trainable matches (and what it selects), "
            "then exit without compiling",
        ),
    ] = False,
) -> None:
    """Compile a model and loss into a bundle that devices train with onnxruntime."""
    if out is None and not list_params:
        raise typer.BadParameter("--out is required (or --list-params)", param_hint="--out")
    try:
        # Imported here so `fedmq --help` and other commands never load torch.
        from fedmq.compile import compile_module, load_factory  # noqa: PLC0415
        from fedmq.compile.listing import format_rows, list_state  # noqa: PLC0415
        from fedmq.compile.onnx_import import import_onnx  # noqa: PLC0415
    except ImportError as exc:
        typer.echo(f"error: fedmq compile needs the compile extra ({exc})", err=True)
        raise typer.Exit(exit_codes.COMPILE_ERROR) from exc
    if input_dtype not in ("float32", "int64"):
        typer.echo(f"error: --input-dtype must be float32 or int64, not {input_dtype}", err=True)
        raise typer.Exit(exit_codes.COMPILE_ERROR)
    try:
        onnx_source = None
        if source.endswith(".onnx"):
            imported = import_onnx(source)
            model, graph_shape, onnx_source = (
                imported.module,
                imported.example_shape,
                imported.source,
            )
            shape = _parse_shape(input_shape) if input_shape else graph_shape
            if shape != graph_shape:
                raise CompileError(f"--input-shape {shape} differs from the graph's {graph_shape}")
        else:
            if not input_shape and not list_params:
                raise CompileError("--input-shape is required for a model factory")
            shape = _parse_shape(input_shape) if input_shape else ()
            model = load_factory(source, seed=seed)
        if list_params:
            rows = list_state(model, trainable, onnx_source)
            typer.echo(format_rows(rows, onnx=onnx_source is not None))
            return
        assert out is not None  # checked above
        bundle = compile_module(
            model,
            input_shape=shape,
            loss=loss.value,
            name=name or out.resolve().name,
            input_dtype=input_dtype,  # type: ignore[arg-type]
            trainable=trainable,
            batchnorm=batchnorm.value,
            source=onnx_source,
        )
    except CompileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exit_codes.COMPILE_ERROR) from exc
    bundle.write(out)
    manifest = bundle.manifest
    total = sum(len(data) for data in bundle.files().values())
    parameters = sum(t.size for t in manifest.tensors if t.kind == "parameter")
    trained = sum(t.size for t in manifest.tensors if t.trainable)
    typer.echo(
        f"wrote {out} ({total / 1024:.1f} KiB): {parameters} parameters, {trained} trainable, "
        f"{len(manifest.update_names)} tensors per update, loss {manifest.loss}"
    )
    if manifest.source is not None:
        typer.echo(
            f"fedmq export restores the file's interface: input {manifest.source.input.name!r}, "
            f"output {manifest.source.output.name!r}, "
            f"{len(manifest.source.initializers)} initializers under their original names"
        )
