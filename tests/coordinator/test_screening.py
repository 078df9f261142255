"""An authenticated but hostile device: capped example counts, the norm screen, and a
non-finite new model that is never published (the federation goes on with the old one)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.support import SHAPES, Harness, config, delta, envelope, initial_params, schema
from fedmq.coordinator.actions import Noted, RoundClosed
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import SyncPolicy
from fedmq.coordinator.screening import ScreeningPolicy
from fedmq.coordinator.validation import verify_update
from fedmq.errors import ConfigError
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.strategies.strategy import Strategy
from fedmq.wire.tensors import decode_tensors
from fedmq.wire.training import TrainingConfig

AGENTS = ("a", "b", "c", "d", "e")


def _harness(
    agents: tuple[str, ...] = ("a", "b", "c"),
    strategy: Strategy | None = None,
    rounds: int = 3,
    **overrides: Any,
) -> Harness:
    cfg = config(rounds=rounds, sync=SyncPolicy(min_agents=len(agents)), **overrides)
    harness = Harness.create(cfg, strategy)
    harness.online(*agents)
    assert harness.coordinator.phase == "collecting"
    return harness


def _scaled(seed: int, value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()}


def _norm(tensors: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(t.astype(np.float64) ** 2) for t in tensors.values())))


def _notes(harness: Harness) -> list[str]:
    return [action.message for action in harness.log if isinstance(action, Noted)]


def _mean(pairs: list[tuple[float, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    base = initial_params()
    total = sum(w for w, _ in pairs)
    return {name: base[name] + sum(w * d[name] for w, d in pairs) / total for name in SHAPES}


def _assert_model(harness: Harness, expected: dict[str, np.ndarray]) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(harness.coordinator.params[name], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ example counts


def test_a_claimed_example_count_is_capped_and_the_record_keeps_claim_and_weight() -> None:
    harness = _harness(("a", "b"), rounds=1)
    huge = harness.update("a", 1, delta(1), examples=10**9, metrics={"train_loss": 1.0})
    harness.update("b", 1, delta(2), examples=100, metrics={"train_loss": 3.0})
    [record] = harness.records
    assert record.outcome == "closed"
    first, second = record.contributions
    assert (first.client, first.examples, first.counted_examples) == ("a", 10**9, 100_000)
    assert first.weight == 100_000
    assert (second.examples, second.counted_examples, second.weight) == (100, 100, 100)
    # The model and the metrics are weighted by what was counted, not by the claim.
    _assert_model(harness, _mean([(100_000, delta(1)), (100, delta(2))]))
    assert record.metrics["train_loss"] == pytest.approx((100_000 + 300) / 100_100)
    assert record.metrics["examples"] == 100_100
    [note] = [n for n in _notes(harness) if "max_examples" in n]
    assert "a claims 1000000000 examples" in note
    assert huge in note
    [ack] = [a for a in harness.acks("a") if a.update_id == huge]
    assert ack.accepted
    assert "weight 100000" in ack.detail


def test_the_cap_is_configurable_and_the_staleness_discount_applies_on_top() -> None:
    policy = SyncPolicy(min_agents=3, target_updates=2, late_updates="fold", max_staleness=1)
    harness = Harness.create(
        config(rounds=2, sync=policy, screening=ScreeningPolicy(max_examples=50))
    )
    harness.online("a", "b", "c")
    harness.update("a", 1, delta(1), examples=10)
    harness.update("b", 1, delta(2), examples=1000)
    assert harness.coordinator.round == 2  # closed at the target; c's update is late
    harness.update("c", 1, delta(3), examples=10**6)
    first = harness.records[0]
    assert [c.weight for c in first.contributions] == [10, 50]
    folded = harness.coordinator.state.round.contributions[-1]
    assert folded.counted_examples == 50
    assert folded.weight == pytest.approx(50 / np.sqrt(2))


def test_screening_settings_are_validated() -> None:
    for bad in (
        {"max_examples": 0},
        {"norm_factor": 1.0},
        {"norm_factor": float("inf")},
        {"max_norm": 0.0},
        {"norm_window": 0},
        {"min_history": 65},
        {"norm_mode": "warn"},
    ):
        with pytest.raises(ConfigError):
            ScreeningPolicy(**bad)


# ------------------------------------------------------------------ the norm screen


def test_a_huge_finite_delta_is_rejected_as_an_outlier_by_default_even_first() -> None:
    harness = _harness(rounds=1)
    attack = harness.update("a", 1, _scaled(0, 1e30))  # finite in float32
    [ack] = harness.acks("a")
    assert (ack.update_id, ack.accepted, ack.reason) == (attack, False, "outlier")
    assert "global model's scale" in ack.detail
    assert [r.reason for r in harness.rejected] == ["outlier"]
    assert harness.coordinator.status(harness.now).rejected == {"outlier": 1}
    harness.update("b", 1, delta(2))
    harness.update("c", 1, delta(3))
    # The refused agent is not waited for: the round closes with the honest two.
    [record] = harness.records
    assert (record.outcome, record.reason, record.rejected) == (
        "closed",
        "all_reported",
        {"outlier": 1},
    )
    assert [c.client for c in record.contributions] == ["b", "c"]
    _assert_model(harness, _mean([(10, delta(2)), (10, delta(3))]))
    assert all(np.isfinite(v).all() for v in harness.coordinator.params.values())


def test_the_bound_follows_the_median_of_the_accepted_norms() -> None:
    harness = _harness(AGENTS)
    for seed, client in enumerate(AGENTS):
        harness.update(client, 1, delta(seed, scale=0.1))
    honest = [_norm(delta(seed, scale=0.1)) for seed in range(len(AGENTS))]
    np.testing.assert_allclose(harness.coordinator.state.norms, honest, rtol=1e-5)
    # 20x the honest norm: well within the model's scale (~240), far above 10x the median.
    outlier = harness.update("a", 2, delta(10, scale=2.0))
    [ack] = [a for a in harness.acks("a") if a.update_id == outlier]
    assert ack.reason == "outlier"
    assert "median of the last 5 accepted norms" in ack.detail
    bound = 10 * float(np.median(honest))
    assert f"{bound:.4g}" in ack.detail
    fine = harness.update("b", 2, delta(11, scale=0.5))  # 5x: a big but plausible step
    assert [a.reason for a in harness.acks("b") if a.update_id == fine] == ["accepted"]


def test_max_norm_bounds_every_update() -> None:
    harness = _harness(rounds=1, screening=ScreeningPolicy(max_norm=1.0))
    big = harness.update("a", 1, delta(1, scale=0.1))  # norm ~2.4
    small = harness.update("b", 1, delta(2, scale=0.01))
    assert [(a.update_id, a.reason) for a in harness.acks("a")] == [(big, "outlier")]
    assert "max_norm" in harness.acks("a")[0].detail
    assert [(a.update_id, a.reason) for a in harness.acks("b")] == [(small, "accepted")]


def test_clip_mode_folds_an_outlier_scaled_down_to_the_bound() -> None:
    screening = ScreeningPolicy(norm_mode="clip", max_norm=1.0)
    harness = _harness(("a", "b"), rounds=1, screening=screening)
    big, small = delta(1, scale=0.1), delta(2, scale=0.01)
    harness.update("a", 1, big)
    harness.update("b", 1, small)
    [record] = harness.records
    clipped, kept = record.contributions
    assert clipped.norm == pytest.approx(_norm(big), rel=1e-5)
    assert clipped.norm_scale == pytest.approx(1.0 / _norm(big), rel=1e-5)
    assert clipped.folded_norm == pytest.approx(1.0)
    assert (kept.norm_scale, kept.norm) == (1.0, pytest.approx(_norm(small), rel=1e-5))
    scale = clipped.norm_scale
    scaled = {name: value * np.float32(scale) for name, value in big.items()}
    _assert_model(harness, _mean([(10, scaled), (10, small)]))
    assert any("clipped update" in note for note in _notes(harness))
    assert "norm clipped from" in harness.acks("a")[0].detail
    assert harness.coordinator.state.norms == [pytest.approx(1.0), kept.norm]


def test_norm_mode_off_screens_nothing() -> None:
    harness = _harness(("a",), rounds=1, screening=ScreeningPolicy(norm_mode="off"))
    harness.update("a", 1, _scaled(0, 1e3))
    assert [a.reason for a in harness.acks("a")] == ["accepted"]


# ------------------------------------------------------------------ restarts


def _restore(harness: Harness, cfg: Any, snapshot: dict[str, Any] | None = None) -> Coordinator:
    snapshot = snapshot or harness.snapshots[-1]
    checkpoint = harness.checkpoints[snapshot["checkpoint"]]
    coordinator = Coordinator.restore(
        cfg,
        build_strategy(StrategyConfig()),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=harness.now,
    )
    return coordinator


def test_the_norm_history_survives_a_restart() -> None:
    cfg = config(rounds=3, sync=SyncPolicy(min_agents=len(AGENTS)))
    harness = Harness.create(cfg)
    harness.online(*AGENTS)
    for seed, client in enumerate(AGENTS):
        harness.update(client, 1, delta(seed, scale=0.1))
    norms = harness.coordinator.state.norms
    assert harness.snapshots[-1]["screen"]["norms"] == norms
    restarted = Harness(_restore(harness, cfg), now=harness.now)
    assert restarted.coordinator.state.norms == norms
    restarted.run(restarted.coordinator.start(restarted.now))
    restarted.online(*AGENTS)
    outlier = restarted.update("a", 2, delta(10, scale=2.0))
    assert [(a.update_id, a.reason) for a in restarted.acks("a")] == [(outlier, "outlier")]


def test_snapshots_without_a_norm_history_or_of_another_training_config_start_afresh() -> None:
    cfg = config(rounds=3, sync=SyncPolicy(min_agents=len(AGENTS)))
    harness = Harness.create(cfg)
    harness.online(*AGENTS)
    for seed, client in enumerate(AGENTS):
        harness.update(client, 1, delta(seed, scale=0.1))
    old = {k: v for k, v in harness.snapshots[-1].items() if k != "screen"}  # before the screen
    assert _restore(harness, cfg, old).state.norms == []
    retrained = config(
        rounds=3, sync=SyncPolicy(min_agents=len(AGENTS)), training=TrainingConfig(lr=1.0)
    )
    assert _restore(harness, retrained).state.norms == []


def test_clip_mode_replays_to_the_same_model_after_a_crash() -> None:
    screening = ScreeningPolicy(norm_mode="clip", min_history=2, norm_factor=2.0)
    cfg = config(rounds=1, settle_s=1.0, sync=SyncPolicy(min_agents=4), screening=screening)
    sends = [
        envelope(client, 1, delta(seed, scale=scale))
        for seed, (client, scale) in enumerate([("a", 0.1), ("b", 0.1), ("c", 1.0), ("d", 0.1)])
    ]

    def run(harness: Harness, upto: int) -> None:
        for (uid, data), client in zip(sends[:upto], "abcd"[:upto], strict=True):
            harness.send(data, client, 1, uid)

    whole = Harness.create(cfg)
    whole.online(*"abcd")
    whole.advance(1.0)  # the settle period
    run(whole, 4)
    [record] = whole.records
    assert record.contributions[2].norm_scale < 1  # c was clipped to 2x the median

    crashed = Harness.create(cfg)
    crashed.online(*"abcd")
    crashed.advance(1.0)
    run(crashed, 3)
    coordinator = _restore(crashed, cfg)
    replayed = Harness(coordinator, now=crashed.now)
    for ticket in sorted(crashed.stored, key=lambda t: t.seq):
        result = verify_update(ticket.key, ticket.update.data, coordinator.schema)
        replayed.run(coordinator.replay(result, ticket.seq, replayed.now))  # type: ignore[arg-type]
    replayed.run(coordinator.start(replayed.now))
    replayed.online(*"abcd")  # retained statuses arrive during the settle period
    replayed.advance(1.0)
    uid, data = sends[3]
    replayed.send(data, "d", 1, uid)
    assert replayed.records[0].contributions == record.contributions
    for name in SHAPES:
        np.testing.assert_array_equal(coordinator.params[name], whole.coordinator.params[name])


# ------------------------------------------------------------------ non-finite models


def _overflowing(harness: Harness, round_id: int, clients: tuple[str, ...]) -> None:
    # Each update is finite (3e38 < float32 max); their weighted sum is not.
    for client in clients:
        harness.update(client, round_id, _scaled(0, 3e38))


def test_a_non_finite_new_model_fails_the_round_and_the_old_model_stays_published() -> None:
    harness = _harness(("a", "b"), screening=ScreeningPolicy(norm_mode="off"))
    first = harness.announcements()[-1]
    _overflowing(harness, 1, ("a", "b"))
    assert harness.closed == [RoundClosed(1, "failed", "non_finite_model")]
    [record] = harness.records
    assert (record.outcome, record.reason, len(record.contributions)) == (
        "failed",
        "non_finite_model",
        2,
    )
    assert any("not finite" in note for note in _notes(harness))
    # Nothing non-finite is published or checkpointed: round 2 starts from the old model.
    for name, value in initial_params().items():
        np.testing.assert_array_equal(harness.coordinator.params[name], value)
    second = harness.announcements()[-1]
    assert (second.round, second.status) == (2, "open")
    assert second.params == first.params
    assert harness.checkpoints[1].params == harness.checkpoints[0].params
    assert all(
        np.isfinite(value).all() for value in decode_tensors(harness.checkpoints[1].params).values()
    )
    assert harness.coordinator.status(harness.now).metrics == {}
    # The federation goes on: honest updates close round 2 with a new model.
    harness.update("a", 2, delta(1))
    harness.update("b", 2, delta(2))
    assert harness.closed[-1].outcome == "closed"
    _assert_model(harness, _mean([(10, delta(1)), (10, delta(2))]))


def test_a_failed_step_leaves_the_server_optimizer_as_it_was() -> None:
    strategy = build_strategy(StrategyConfig(name="fedadam", eta=0.05))
    harness = _harness(("a", "b"), strategy, screening=ScreeningPolicy(norm_mode="off"))
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    assert harness.closed[-1].outcome == "closed"
    before = {k: v.copy() for k, v in strategy.state_dict().items()}
    model = {k: v.copy() for k, v in harness.coordinator.params.items()}
    # 1e20 is finite and so is the step, but delta**2 overflows FedAdam's v to Inf.
    for client in ("a", "b"):
        harness.update(client, 2, _scaled(0, 1e20))
    assert harness.closed[-1] == RoundClosed(2, "failed", "non_finite_model")
    after = strategy.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    for name, value in model.items():
        np.testing.assert_array_equal(harness.coordinator.params[name], value)
    _, optimizer = harness.checkpoints[2].params, harness.checkpoints[2].optimizer
    assert all(np.isfinite(v).all() for v in decode_tensors(optimizer).values())
    harness.update("a", 3, delta(3))
    harness.update("b", 3, delta(4))
    assert harness.closed[-1].outcome == "closed"
    assert all(np.isfinite(v).all() for v in harness.coordinator.params.values())
