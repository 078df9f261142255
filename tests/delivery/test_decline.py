"""An agent that cannot take part says so, and the round does not wait for it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from agent.helpers import running_agent
from aggregator.scripted import make_settings, records, running_service, wait_for

from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.broker]


def bad_data(directory: Path) -> Path:
    """Digits-like data with 10 features instead of the model's 64."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(
        directory / "train.npz",
        x=rng.random((100, 10), dtype=np.float32),
        y=rng.integers(0, 10, 100),
    )
    return directory


async def test_a_device_with_bad_data_declines_and_the_round_closes_without_it(
    broker: MosquittoBroker,
    federation: str,
    tmp_path: Path,
    make_settings_agent: Callable[..., AgentSettings],
) -> None:
    settings = make_settings(
        broker,
        federation,
        tmp_path / "state",
        round={"deadline_s": 120.0, "min_agents": 2},
    )
    good = make_settings_agent(broker.url, "press-good")
    broken = make_settings_agent(
        broker.url, "press-bad", data={"path": str(bad_data(tmp_path / "bad"))}
    )
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(running_service(settings))
        await stack.enter_async_context(running_agent(broken))
        await stack.enter_async_context(running_agent(good))
        await wait_for(lambda: service.statistics().rounds_closed >= 1, timeout=60)
    record = records(settings.state_dir)[0]
    assert record.outcome == "closed"
    assert [c.client for c in record.contributions] == ["press-good"]
    assert record.declined == {"press-bad": "data_error"}
    assert record.closed_at - record.opened_at < 60  # seconds, against a 120 s deadline
