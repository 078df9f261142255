"""Model factories: the ``package.module:function`` references ``fedmq compile`` takes."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from fedmq.errors import CompileError


def load_factory(reference: str, *, seed: int | None = None) -> nn.Module:
    """Call the model factory ``package.module:function`` or ``path/file.py:function``.

    The current directory is importable (as with ``python -m``), so a project's own
    packages resolve without installing them.

    Args:
        reference: where the factory is.
        seed: torch seed set before the factory's module is imported and the factory
            runs (reproducible initial weights); None leaves torch's generator alone.

    Raises:
        CompileError: the reference does not resolve or the factory returns no module.
    """
    module_ref, sep, attr = reference.partition(":")
    if not sep or not attr:
        raise CompileError(f"{reference!r}: expected package.module:function or file.py:function")
    if seed is not None:
        torch.manual_seed(seed)  # before the import: module-level code may draw too
    try:
        if module_ref.endswith(".py"):
            path = Path(module_ref).resolve()
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None or not path.is_file():
                raise CompileError(f"{module_ref}: no such Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            sys.path.insert(0, str(path.parent))
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_ref)
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(f"cannot import {module_ref}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CompileError(f"{module_ref} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise CompileError(f"{reference}() returned {type(model).__name__}, not an nn.Module")
    return model
