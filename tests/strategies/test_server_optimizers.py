"""Server optimizers against their update rules written out in numpy, over several rounds."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.errors import LocalProtocolError
from fedmq.strategies import (
    ServerAdagrad,
    ServerAdam,
    ServerMomentum,
    ServerOptimizer,
    ServerSgd,
    ServerYogi,
    Strategy,
    WeightedMean,
)
from strategies.support import LAYOUT, cohort, params

ROUNDS = 4


def _deltas() -> list[dict[str, np.ndarray]]:
    return cohort(ROUNDS, seed=5)


def _run(
    optimizer: ServerOptimizer, deltas: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    x = params()
    history = []
    for delta in deltas:
        x = {**x, **optimizer.step({k: x[k] for k in delta}, delta)}
        history.append(x)
    return history


def _reference_adaptive(kind: str, deltas, eta=1e-2, b1=0.9, b2=0.99, tau=1e-3):  # type: ignore[no-untyped-def]
    x = {k: v.astype(np.float64) for k, v in params().items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau**2) for k, val in x.items()}
    history = []
    for delta in deltas:
        for k, d32 in delta.items():
            d = d32.astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * d
            if kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d * d
            elif kind == "yogi":
                v[k] = v[k] - (1 - b2) * d * d * np.sign(v[k] - d * d)
            else:
                v[k] = v[k] + d * d
            x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        history.append({k: val.copy() for k, val in x.items()})
    return history


@pytest.mark.parametrize(
    ("kind", "optimizer"),
    [("adam", ServerAdam), ("yogi", ServerYogi), ("adagrad", ServerAdagrad)],
)
def test_adaptive_optimizers_follow_reddi_et_al(
    kind: str, optimizer: type[ServerOptimizer]
) -> None:
    deltas = _deltas()
    got = _run(optimizer(), deltas)  # type: ignore[call-arg]
    want = _reference_adaptive(kind, deltas)
    for g, w in zip(got, want, strict=True):
        for name in g:
            np.testing.assert_allclose(g[name], w[name], rtol=1e-4, atol=1e-6)


def test_momentum_follows_the_heavy_ball_recurrence() -> None:
    deltas = _deltas()
    got = _run(ServerMomentum(server_lr=0.7, momentum=0.5), deltas)
    x = params()
    velocity = {k: np.zeros_like(v) for k, v in x.items()}
    for delta, g in zip(deltas, got, strict=True):
        for k, d in delta.items():
            velocity[k] = 0.5 * velocity[k] + d
            x[k] = x[k] + 0.7 * velocity[k]
            np.testing.assert_allclose(g[k], x[k], rtol=1e-5, atol=1e-6)


def test_zero_momentum_is_fedavg() -> None:
    deltas = _deltas()
    for a, b in zip(
        _run(ServerMomentum(1.0, 0.0), deltas), _run(ServerSgd(1.0), deltas), strict=True
    ):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6)


@pytest.mark.parametrize(
    "factory",
    [lambda: ServerMomentum(0.9, 0.8), ServerAdam, ServerYogi, ServerAdagrad],
)
def test_a_restored_optimizer_continues_identically(factory) -> None:  # type: ignore[no-untyped-def]
    deltas = _deltas()
    straight = _run(factory(), deltas)
    first = factory()
    halfway = _run(first, deltas[:2])[-1]
    second = factory()
    second.load_state_dict(first.state_dict())
    x = halfway
    for delta in deltas[2:]:
        x = {**x, **second.step({k: x[k] for k in delta}, delta)}
    for name in x:
        np.testing.assert_array_equal(x[name], straight[-1][name])


def test_adaptive_step_is_bounded_by_eta() -> None:
    # |m| / sqrt(v) <= 1/sqrt(1 - beta2) * ... for Adam's first step: |step| <= eta * sqrt(...)
    huge = {k: np.full_like(v, 1e6) for k, v in params().items()}
    out = ServerAdam(eta=0.01).step(params(), huge)
    for name, value in out.items():
        assert np.all(np.abs(value - params()[name]) <= 0.01 * 1.01)


def test_buffers_take_the_plain_mean_under_a_server_optimizer() -> None:
    # running_var is not optimized: Adam must not touch it.
    updates = cohort(2, seed=3)
    base = params()
    strategy = Strategy(WeightedMean(), ServerAdam())
    strategy.begin_round(1, LAYOUT)
    for update in updates:
        strategy.fold(update, 1.0)
    new = strategy.finalize(base)
    expected = base["running_var"] + (updates[0]["running_var"] + updates[1]["running_var"]) / 2
    np.testing.assert_allclose(new["running_var"], expected, rtol=1e-6)
    assert not np.allclose(new["w"], base["w"] + (updates[0]["w"] + updates[1]["w"]) / 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ServerSgd(0),
        lambda: ServerMomentum(1.0, 1.0),
        lambda: ServerAdam(eta=0),
        lambda: ServerYogi(beta1=1.0),
        lambda: ServerAdagrad(tau=-1),
    ],
)
def test_invalid_hyper_parameters_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError):
        make()


def test_foreign_state_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="state"):
        ServerAdam().load_state_dict({"velocity/w": np.zeros(3, np.float32)})
    with pytest.raises(LocalProtocolError, match="no state"):
        ServerSgd().load_state_dict({"m/w": np.zeros(3, np.float32)})
