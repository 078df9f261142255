"""Two devices configured with one client id: one stops with a clear error, not a loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.config import AgentSettings
from edge_agent.daemon import Agent
from edge_agent.systemd import Notifier
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import ConfigError
from fedmq.timeouts import within

pytestmark = [pytest.mark.broker]


async def test_one_of_two_agents_sharing_an_id_stops_naming_it(
    broker: MosquittoBroker, make_settings_agent: Callable[..., AgentSettings], tmp_path: Path
) -> None:
    first = make_settings_agent(broker.url, "press-twin")
    second = first.model_copy(update={"state_dir": tmp_path / "other-state"})
    agents = [Agent(s, notifier=Notifier({})) for s in (first, second)]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        done, _ = await within(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED), 60)
        failure = next(iter(done)).exception()
    finally:
        for agent in agents:
            agent.request_stop()
        await within(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert isinstance(failure, ExceptionGroup)
    errors, _ = failure.split(ConfigError)
    assert errors is not None
    message = str(errors.exceptions[0])
    assert "client id 'press-twin'" in message
    assert "its own client_id" in message
