"""Every compiled family exports as a standalone model onnxruntime loads without a warning.

BatchNorm in train mode (``cnn``, ``conv1d_classifier``) and eval mode
(``cnn_bn_eval_head``) included; shipped bundles are checked in
``tests/aggregator/test_export.py``, imported ONNX files in ``test_onnx_import.py`` and
``test_byom.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from aggregator.export_support import check_standalone, example_input, perturbed
from torch import nn

from compile.test_families import FAMILIES
from compile.test_max_pool import MODELS as POOL_MODELS

if TYPE_CHECKING:
    from compile.conftest import CompileCache

pytestmark = pytest.mark.compile

# Keys and options as test_families.py / test_max_pool.py compile them, so the session
# cache compiles each model once for all three files.
ALL: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    **FAMILIES,
    **{
        name: (factory, {"input_shape": shape, "loss": "cross_entropy"})
        for name, (factory, shape) in POOL_MODELS.items()
    },
}


@pytest.mark.parametrize("family", sorted(ALL))
def test_family_exports_standalone(compiled: CompileCache, family: str) -> None:
    factory, options = ALL[family]
    bundle = compiled.get(family, factory, **options).bundle
    check_standalone(bundle, perturbed(bundle, 5), example_input(bundle, batch=4))


def test_batchnorm_modes_are_covered() -> None:
    modes = {options.get("batchnorm", "train") for _, options in FAMILIES.values()}
    assert modes == {"train", "eval"}
