"""The numpy runtime against PyTorch doing the same thing (needs the compile extra)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedmq.bundle import Bundle
from fedmq.runtime import Trainer
from fedmq.runtime.optim import clip_by_global_norm, make_optimizer
from fedmq.wire.training import TrainingConfig

pytestmark = pytest.mark.compile

torch = pytest.importorskip("torch")

CONFIGS = [
    {"optimizer": "sgd", "lr": 0.1},
    {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.01},
    {"optimizer": "momentum", "lr": 0.05, "momentum": 0.9},
    {"optimizer": "nesterov", "lr": 0.05, "momentum": 0.8, "weight_decay": 0.001},
    {"optimizer": "adam", "lr": 0.01, "betas": (0.8, 0.99)},
    {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.01},
    {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "eps": 1e-6},
]


def torch_optimizer(params: list[Any], config: TrainingConfig) -> Any:
    if config.optimizer in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=0.0 if config.optimizer == "sgd" else config.momentum,
            nesterov=config.optimizer == "nesterov",
            weight_decay=config.weight_decay,
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


@pytest.mark.parametrize(
    "options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_optimizer_steps_match_torch_optim(options: dict[str, Any]) -> None:
    config = TrainingConfig(**options)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(50).astype(np.float32)
    reference = torch.nn.Parameter(torch.tensor(weights.copy()))
    ours = make_optimizer(config, weights.size)
    theirs = torch_optimizer([reference], config)
    for _ in range(8):
        grad = rng.standard_normal(50).astype(np.float32)
        ours.step(weights, grad.copy())
        reference.grad = torch.tensor(grad)
        theirs.step()
        np.testing.assert_allclose(weights, reference.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clipping_matches_clip_grad_norm() -> None:
    grads = [torch.randn(5, 3), torch.randn(7)]
    flat = torch.cat([g.flatten() for g in grads]).numpy().copy()
    norm = clip_by_global_norm(flat, 0.5)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(params, 0.5)  # returns the norm before clipping
    assert norm == pytest.approx(float(expected), rel=1e-6)
    np.testing.assert_allclose(
        flat, torch.cat([p.grad.flatten() for p in params]).numpy(), rtol=1e-6
    )


def _digits_mlp() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "models.py"
    spec = importlib.util.spec_from_file_location("example_models", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits_mlp()


def torch_train(
    bundle: Bundle, x: np.ndarray, y: np.ndarray, config: TrainingConfig
) -> dict[str, np.ndarray]:
    """The same loop as Trainer.train, written with torch autograd and torch.optim."""
    model = _digits_mlp()
    with torch.no_grad():
        for name, value in bundle.initial_parameters().items():
            model.get_parameter(name).copy_(torch.tensor(value))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch_optimizer(list(model.parameters()), config)
    rng = np.random.default_rng(config.seed)
    steps = 0
    for _ in range(config.epochs):
        order = rng.permutation(len(x))
        for begin in range(0, len(x), config.batch_size):
            if config.max_steps is not None and steps >= config.max_steps:
                break
            index = order[begin : begin + config.batch_size]
            loss = torch.nn.functional.cross_entropy(
                model(torch.tensor(x[index])), torch.tensor(y[index])
            )
            if config.prox_mu:
                loss = loss + config.prox_mu / 2 * sum(
                    ((p - start[n]) ** 2).sum() for n, p in model.named_parameters()
                )
            optimizer.zero_grad()
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
            steps += 1
    return {n: (p.detach() - start[n]).numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "nesterov", "lr": 0.05, "weight_decay": 0.001},
        {"optimizer": "adam", "lr": 0.005, "clip_grad_norm": 0.5},
        {"optimizer": "adamw", "lr": 0.005, "weight_decay": 0.05, "prox_mu": 0.1},
    ],
    ids=["nesterov", "adam-clip", "adamw-prox"],
)
def test_training_run_matches_torch_loop(
    mlp_bundle: Bundle, digits: tuple[np.ndarray, ...], options: dict[str, Any]
) -> None:
    x, y = digits[0][:300], digits[1][:300]
    config = TrainingConfig(epochs=2, batch_size=32, seed=4, **options)
    ours = Trainer(mlp_bundle).train(mlp_bundle.initial_parameters(), x, y, config)
    theirs = torch_train(mlp_bundle, x, y, config)
    for name, delta in theirs.items():
        np.testing.assert_allclose(ours.delta[name], delta, rtol=1e-3, atol=2e-5, err_msg=name)


def test_digits_mlp_15_epochs_accuracy_matches_torch(
    mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]
) -> None:
    x_train, y_train, x_test, y_test = digits
    config = TrainingConfig(epochs=15, batch_size=32, lr=0.1, seed=0)
    trainer = Trainer(mlp_bundle)
    params = mlp_bundle.initial_parameters()
    result = trainer.train(params, x_train, y_train, config)
    ours = trainer.evaluate(
        {n: v + result.delta.get(n, 0) for n, v in params.items()}, x_test, y_test
    )
    theirs_delta = torch_train(mlp_bundle, x_train, y_train, config)
    model = _digits_mlp()
    with torch.no_grad():
        for name, value in params.items():
            model.get_parameter(name).copy_(torch.tensor(value + theirs_delta[name]))
        predictions = model(torch.tensor(x_test)).argmax(1).numpy()
    theirs = float((predictions == y_test).mean())
    assert ours["accuracy"] > 0.9
    assert abs(ours["accuracy"] - theirs) <= 0.01
