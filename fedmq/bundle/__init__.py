"""Model bundles: the files a device needs to train a model (pure: no torch, no onnxruntime).

A bundle is a directory (or the same files held in memory)::

    manifest.json     what the graphs expect, which tensors train, sha256 of the other files
    train_step.onnx   (input, label, dropout masks, parameters, buffers) -> loss, gradients,
                      updated buffers
    model.onnx        (input, parameters, buffers) -> output; every parameter/buffer input
                      has an initializer default, so it also runs as a plain inference model
    parameters.npz    initial parameter and buffer values (the device has no ``onnx`` package
                      to read initializers with)

A model compiled from an ONNX file also records that file's interface (input/output
names, initializer names and layouts: :class:`OnnxSource`) so ``fedmq export`` restores it.
"""

from fedmq.bundle.bundle import BUNDLE_FILES, Bundle
from fedmq.bundle.manifest import (
    BATCH,
    FORMAT_VERSION,
    DropoutSpec,
    LossName,
    Manifest,
    StateTensor,
    TensorSpec,
    dropout_input_name,
    gradient_output_name,
    updated_buffer_output_name,
)
from fedmq.bundle.parameters import read_parameters, write_parameters
from fedmq.bundle.source import OnnxSource, SourceInitializer, SourceValue

__all__ = [
    "BATCH",
    "BUNDLE_FILES",
    "FORMAT_VERSION",
    "Bundle",
    "DropoutSpec",
    "LossName",
    "Manifest",
    "OnnxSource",
    "SourceInitializer",
    "SourceValue",
    "StateTensor",
    "TensorSpec",
    "dropout_input_name",
    "gradient_output_name",
    "read_parameters",
    "updated_buffer_output_name",
    "write_parameters",
]
