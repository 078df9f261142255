"""The agent object's life: ready or a clear failure (never a hang), and jittered retries."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.helpers import AGENT_STOP_TIMEOUT, eventually, running_agent
from agent.scripted import ScriptedAggregator
from edge_agent.config import AgentSettings
from edge_agent.daemon import Agent
from edge_agent.state import StateDir
from edge_agent.systemd import Notifier
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.broker.process import free_port
from fedmq.errors import ConfigError, TransportError
from fedmq.timeouts import within

WAIT = 10.0  # seconds: every wait below ends in well under one on a healthy machine


async def test_wait_ready_raises_what_run_failed_with(
    make_settings: Callable[..., AgentSettings],
) -> None:
    settings = make_settings("mqtt://127.0.0.1:1")
    holder = StateDir(settings.state_dir, settings.federation)  # another agent holds it
    try:
        agent = Agent(settings, notifier=Notifier({}))
        task = asyncio.create_task(agent.run())
        with pytest.raises(ConfigError, match="another fedmq-agent"):
            await within(agent.wait_ready(), WAIT)
        with pytest.raises(ConfigError):
            await task
    finally:
        holder.close()
    assert not agent.connected


async def test_wait_ready_raises_when_stopped_before_connecting(
    make_settings: Callable[..., AgentSettings],
) -> None:
    agent = Agent(make_settings(f"mqtt://127.0.0.1:{free_port()}"), notifier=Notifier({}))
    task = asyncio.create_task(agent.run())
    waiter = asyncio.create_task(agent.wait_ready())
    await asyncio.sleep(0.3)  # trying to connect to a port nobody listens on
    assert not waiter.done()
    agent.request_stop()
    with pytest.raises(TransportError, match="stopped before it connected"):
        await within(waiter, WAIT)
    await within(task, AGENT_STOP_TIMEOUT)


@pytest.mark.broker
async def test_wait_ready_returns_once_connected(
    broker: MosquittoBroker, make_settings: Callable[..., AgentSettings]
) -> None:
    async with running_agent(make_settings(broker.url)) as agent:
        assert agent.connected
        await within(agent.wait_ready(), WAIT)  # and again at once
        assert agent.statistics().connections == 1


@pytest.mark.broker
@pytest.mark.slow
async def test_failed_round_is_retried_with_jittered_doubling_waits(
    broker: MosquittoBroker,
    federation: str,
    make_settings: Callable[..., AgentSettings],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    initial = 0.2
    settings = make_settings(
        broker.url, data={"path": str(empty)}, limits={"round_retry_s": initial}
    )
    aggregator = ScriptedAggregator(broker.url, federation)
    caplog.set_level(logging.ERROR, logger="edge_agent.rounds")
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        async with running_agent(settings) as agent:
            await aggregator.announce(1, bundle, params)
            await eventually(lambda: agent.statistics().rounds_failed >= 4, what="4 attempts")
            stats = agent.statistics()
    assert stats.rounds_trained == 0
    assert "no .npz or .csv files" in (stats.last_error or "")
    delays = [
        float(found.group(1))
        for record in caplog.records
        if (found := re.search(r"round 1 failed: .*; retrying in (\S+) s", record.getMessage()))
    ]
    assert len(delays) >= 4
    ceilings = [initial * 2**attempt for attempt in range(4)]
    for delay, ceiling in zip(delays, ceilings, strict=False):
        assert ceiling / 2 * 0.99 <= delay <= ceiling * 1.01  # "equal jitter", 3 digits shown
    assert delays[:4] != ceilings  # not the deterministic doubling (chance ~1e-8)
