"""Helpers for compile tests: cached compiles and the PyTorch-autograd reference."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedmq.bundle import Bundle
from fedmq.compile import compile_module
from fedmq.compile.dropout import masked_dropout
from fedmq.compile.losses import LOSSES

RTOL = 1e-5  # issue 3: gradients within 1e-5 relative ...
ATOL = 1e-6  # ... or 1e-6 absolute
BATCH_SIZES = (3, 8)  # two sizes: proves the batch dimension is really dynamic


@dataclass(frozen=True)
class Compiled:
    """A model and the bundle compiled from it."""

    model: nn.Module
    bundle: Bundle
    batchnorm: str


class CompileCache:
    """Compiles each model once per test session (compiling takes seconds)."""

    def __init__(self) -> None:
        self._done: dict[str, Compiled] = {}

    def get(self, key: str, factory: Callable[[], nn.Module], **options: Any) -> Compiled:
        if key not in self._done:
            torch.manual_seed(0)
            model = factory()
            bundle = compile_module(model, name=key, **options)
            self._done[key] = Compiled(model, bundle, options.get("batchnorm", "train"))
        return self._done[key]


@pytest.fixture(scope="session")
def compiled() -> Iterator[CompileCache]:
    return CompileCache()


def perturbed_state(bundle: Bundle, seed: int) -> dict[str, np.ndarray]:
    """Initial state plus noise, so the check does not hinge on the initial weights."""
    rng = np.random.default_rng(seed)
    state = bundle.initial_parameters()
    for spec in bundle.manifest.tensors:
        value = state[spec.name]
        if spec.dtype != "float32":
            continue
        if spec.name.endswith("running_var"):
            state[spec.name] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
        else:
            state[spec.name] = (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
    return state


def example_batch(bundle: Bundle, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    manifest = bundle.manifest
    x = rng.standard_normal((batch, *manifest.input.example_shape)).astype(np.float32)
    label_shape = (batch, *manifest.label.example_shape)
    if manifest.loss == "cross_entropy":
        y = rng.integers(0, int(manifest.output.shape[1]), label_shape).astype(np.int64)
    elif manifest.loss == "bce_with_logits":
        y = rng.integers(0, 2, label_shape).astype(np.float32)
    else:
        y = rng.standard_normal(label_shape).astype(np.float32)
    return x, y


def torch_reference(
    item: Compiled,
    state: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Loss, gradients and post-step buffers from eager PyTorch autograd."""
    manifest = item.bundle.manifest
    model = copy.deepcopy(item.model).train()
    if item.batchnorm == "eval":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    tensors = {name: torch.tensor(value) for name, value in state.items()}
    params = {n: tensors[n].clone().requires_grad_(True) for n in manifest.trainable_names}
    torch_masks = {name: torch.tensor(mask) for name, mask in masks.items()}
    with masked_dropout(model, torch_masks):
        output = functional_call(model, {**tensors, **params}, (torch.tensor(x),))
    loss = LOSSES[manifest.loss](output, torch.tensor(y))
    grads = torch.autograd.grad(loss, [params[n] for n in manifest.trainable_names])
    return (
        float(loss.detach()),
        {n: g.numpy() for n, g in zip(manifest.trainable_names, grads, strict=True)},
        {n: tensors[n].numpy() for n in manifest.updated_buffer_names},
    )


def assert_train_step_matches_autograd(item: Compiled) -> None:
    """Run train_step.onnx and PyTorch autograd on the same batches; compare everything."""
    bundle = item.bundle
    manifest = bundle.manifest
    session = ort.InferenceSession(bundle.train_step_onnx, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for seed, batch in enumerate(BATCH_SIZES):
        state = perturbed_state(bundle, seed)
        x, y = example_batch(bundle, batch, seed)
        rng = np.random.default_rng(100 + seed)
        masks = {
            d.module: ((rng.random((batch, *d.shape.example_shape)) >= d.p) / (1 - d.p)).astype(
                np.float32
            )
            for d in manifest.dropout
        }
        feeds = {"input": x, "label": y, **{f"dropout/{m}": v for m, v in masks.items()}, **state}
        got = dict(zip(names, session.run(None, feeds), strict=True))
        loss, grads, buffers = torch_reference(item, state, x, y, masks)
        np.testing.assert_allclose(got["loss"], loss, rtol=RTOL, atol=ATOL, err_msg="loss")
        assert set(grads) == set(manifest.trainable_names)
        for name, expected in grads.items():
            np.testing.assert_allclose(
                got[f"grad/{name}"], expected, rtol=RTOL, atol=ATOL, err_msg=f"batch {batch} {name}"
            )
        for name, expected in buffers.items():
            np.testing.assert_allclose(
                got[f"updated/{name}"], expected, rtol=RTOL, atol=ATOL, err_msg=f"buffer {name}"
            )


def assert_model_matches_eval(item: Compiled) -> None:
    """model.onnx with *fed* (non-initial) state equals the eager eval-mode forward."""
    bundle = item.bundle
    session = ort.InferenceSession(bundle.model_onnx, providers=["CPUExecutionProvider"])
    state = perturbed_state(bundle, 7)
    x, _ = example_batch(bundle, 5, 7)
    (got,) = session.run(["output"], {"input": x, **state})
    model = copy.deepcopy(item.model).eval()
    with torch.no_grad():
        expected = functional_call(
            model, {n: torch.tensor(v) for n, v in state.items()}, (torch.tensor(x),)
        )
    np.testing.assert_allclose(got, expected.numpy(), rtol=RTOL, atol=1e-5)


@pytest.fixture(scope="session")
def train_step_check() -> Callable[[Compiled], None]:
    """``check(item)``: train_step.onnx equals PyTorch autograd at two batch sizes."""
    return assert_train_step_matches_autograd


@pytest.fixture(scope="session")
def model_check() -> Callable[[Compiled], None]:
    """``check(item)``: model.onnx with fed state equals the eager eval forward."""
    return assert_model_matches_eval


# Files whose tests compile models by a shared cache key (their "family"/"name"
# parameter): a key's tests must stay on one worker, different keys need not.
_KEYED_FILES = ("test_families.py", "test_export_families.py", "test_max_pool.py")
_KEY_PARAMS = ("family", "name")
# The other compile files, each kept whole on one of the two groups (measured: the
# keyed tests split about 190 s / 140 s, test_byom ~60 s, test_onnx_import ~55 s and
# test_examples ~40 s).
_FILE_GROUP = {"test_byom.py": 1}
COMPILE_GROUPS = 2


def _cache_key(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None or item.path.name not in _KEYED_FILES:
        return None
    for param in _KEY_PARAMS:
        value = callspec.params.get(param)
        if isinstance(value, str):
            return value
    return None


# tryfirst: xdist's own hook turns the group marks into node ids, so ours must come first.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Spread the compile tests over two xdist groups, each model compiled in one only.

    Compiling a model takes seconds and the compile cache lives in one worker, so every
    test of one model (its cache key) goes to the same group; the keys alternate
    between the two groups, and the other files are kept whole.  On one worker (no
    xdist) the marks change nothing.
    """
    compile_items = [
        item for item in items if "tests/compile/" in str(item.path).replace("\\", "/")
    ]
    keys = sorted({key for item in compile_items if (key := _cache_key(item)) is not None})
    group_of_key = {key: index % COMPILE_GROUPS for index, key in enumerate(keys)}
    for item in compile_items:
        key = _cache_key(item)
        group = group_of_key[key] if key is not None else _FILE_GROUP.get(item.path.name, 0)
        item.add_marker(pytest.mark.xdist_group(f"compile-{group}"))
