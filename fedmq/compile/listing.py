"""``fedmq compile --list-params``: the state names ``--trainable`` matches, without compiling.

Names are PyTorch state-dict names: for a factory, the module's own (``0.weight``,
``head.bias``); for an ONNX file, those of the module onnx2torch builds (one submodule
per ONNX node, named after the node: ``fc1.weight``, ``conv_Conv.bias``, or
``initializers.onnx_initializer_<i>`` for a weight fed to a generic node such as
``MatMul``), each beside the initializer it came from, which ``--trainable`` matches
as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from fedmq.bundle.source import OnnxSource, SourceInitializer
from fedmq.compile.compiler import select_trainable


@dataclass(frozen=True)
class StateRow:
    """One parameter or buffer as ``--list-params`` prints it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "parameter" or "buffer"
    trained: bool  # with the given --trainable patterns (all parameters without any)
    original: SourceInitializer | None  # where it came from in the ONNX file

    @property
    def original_text(self) -> str:
        """The ONNX initializer name and how its layout differs, or ``-``."""
        if self.original is None:
            return "-"
        notes = []
        if self.original.transpose:
            notes.append("transposed")
        if self.original.scale != 1.0:
            notes.append(f"x{self.original.scale:g}")
        return self.original.name + (f" ({', '.join(notes)})" if notes else "")


def list_state(
    model: nn.Module,
    trainable: Sequence[str] | None = None,
    source: OnnxSource | None = None,
) -> list[StateRow]:
    """Every parameter and buffer of ``model`` in bundle order.

    Raises:
        CompileError: the ``trainable`` patterns match no parameter.
    """
    origins = {i.tensor: i for i in source.initializers} if source is not None else {}
    aliases = source.original_names() if source is not None else None
    chosen = select_trainable(dict(model.named_parameters()), trainable, aliases)
    rows = [
        StateRow(
            name,
            tuple(p.shape),
            str(p.dtype).removeprefix("torch."),
            "parameter",
            name in chosen,
            origins.get(name),
        )
        for name, p in model.named_parameters()
    ]
    rows += [
        StateRow(
            name,
            tuple(b.shape),
            str(b.dtype).removeprefix("torch."),
            "buffer",
            False,
            origins.get(name),
        )
        for name, b in model.named_buffers()
    ]
    return rows


def format_rows(rows: Sequence[StateRow], *, onnx: bool) -> str:
    """The rows as an aligned text table (header first; ``onnx``: with the origin column)."""
    header = ["name", "shape", "dtype", "kind", "trained", "onnx initializer"]
    table = [header if onnx else header[:-1]]
    for row in rows:
        line = [row.name, str(list(row.shape)), row.dtype, row.kind]
        line.append("yes" if row.trained else "no")
        table.append([*line, row.original_text] if onnx else line)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
