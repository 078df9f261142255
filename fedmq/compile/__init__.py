"""Workstation side of on-device training: PyTorch/ONNX models to model bundles.

Needs the ``compile`` extra (torch, onnx, onnxscript).  Nothing else in fedmq imports
this package, so devices never load torch.
"""

from fedmq.compile.compiler import compile_module

__all__ = ["compile_module"]
