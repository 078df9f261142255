"""An authenticated-looking but hostile agent through a real broker: its 1e30 delta is
refused as an ``outlier``, its 10^9 example claim is counted as ``max_examples``, and the
honest agents keep training on a finite global model round after round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.scripted import (
    ScriptedAgent,
    checkpoint_params,
    fedavg,
    make_settings,
    random_delta,
    read_status,
    records,
    running_service,
)
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.coordinator.screening import DEFAULT_MAX_EXAMPLES

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _finite(params: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(value).all() for value in params.values())


async def test_a_hostile_agent_neither_diverges_nor_dominates_the_federation(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker,
        federation,
        state,
        rounds=2,
        exit_when_finished=False,
        round={"min_agents": 3, "deadline_s": 600},
    )
    a, b, mallory = [
        await ScriptedAgent(broker, federation, name).start() for name in ("a", "b", "mallory")
    ]
    async with running_service(settings):
        first = await a.wait_round(1)
        base = await a.fetch_params(first)
        # The attack that made every agent's next round diverge: huge but finite.
        huge = {name: np.full_like(value, 1e30) for name, value in random_delta(0).items()}
        attack = await mallory.send_update(1, huge, examples=10**9)
        ack = await mallory.wait_ack(attack)
        assert (ack.accepted, ack.reason) == (False, "outlier"), ack.detail
        # A plausible delta claiming an absurd example count counts, at the cap.
        inflated = await mallory.send_update(1, random_delta(9), examples=10**9)
        ack = await mallory.wait_ack(inflated)
        assert (ack.accepted, ack.reason) == (True, "accepted"), ack.detail
        assert f"weight {DEFAULT_MAX_EXAMPLES}" in ack.detail
        for agent, seed, examples in ((a, 1, 100), (b, 2, 200)):
            uid = await agent.send_update(1, random_delta(seed), examples=examples)
            assert (await agent.wait_ack(uid)).reason == "accepted"

        # Round 2 starts from a finite model: the honest agents download it and train on.
        second = await a.wait_round(2)
        after_first = await a.fetch_params(second)
        assert _finite(after_first)
        again = await mallory.send_update(2, huge, examples=10**9)  # it keeps trying
        assert (await mallory.wait_ack(again)).reason == "outlier"
        for agent, seed in ((a, 3), (b, 4)):
            uid = await agent.send_update(2, random_delta(seed), examples=100)
            assert (await agent.wait_ack(uid)).reason == "accepted"
        finished = await a.wait_round(2, "finished")
        final = checkpoint_params(state, finished)
        status = await read_status(broker, federation, until=lambda s: s.state == "finished")

    expected = fedavg(
        base,
        [(DEFAULT_MAX_EXAMPLES, random_delta(9)), (100, random_delta(1)), (200, random_delta(2))],
    )
    for name, value in expected.items():
        np.testing.assert_allclose(after_first[name], value, rtol=1e-5, atol=1e-6)
    assert _finite(final)
    one, two = records(state)
    assert (one.outcome, one.rejected) == ("closed", {"outlier": 1})
    assert [(c.client, c.examples, c.counted_examples, c.weight) for c in one.contributions] == [
        ("mallory", 10**9, DEFAULT_MAX_EXAMPLES, DEFAULT_MAX_EXAMPLES),
        ("a", 100, 100, 100),
        ("b", 200, 200, 200),
    ]
    assert all(c.norm is not None and np.isfinite(c.norm) for c in one.contributions)
    assert (two.outcome, [c.client for c in two.contributions]) == ("closed", ["a", "b"])
    assert two.rejected == {"outlier": 1}
    assert status.rejected == {"outlier": 1}  # the last round's counts
    for agent in (a, b, mallory):
        await agent.stop()
