"""Workstation side of on-device training: PyTorch/ONNX models to model bundles.

Needs the ``compile`` extra (torch, onnx, onnxscript).  Only the ``fedmq compile``
command imports this package, and only when it runs, so devices never load torch.
"""

from fedmq.compile.compiler import compile_module
from fedmq.compile.factory import load_factory

__all__ = ["compile_module", "load_factory"]
