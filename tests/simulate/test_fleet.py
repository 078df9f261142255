"""In-process devices vanish without a goodbye (the broker fires their will) and come back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import parse_settings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.simulate.fleet import InProcessFleet
from fedmq.testing.scripted_clients import ScriptedConnection
from fedmq.wire.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_a_crashed_agent_goes_offline_by_its_will_and_a_revived_one_comes_back(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "train.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    settings = parse_settings(
        {
            "client_id": "dev-1",
            "federation": federation,
            "state_dir": str(tmp_path / "state"),
            "heartbeat_s": 30,  # no heartbeat during the test: every status is an event
            "broker": {"url": broker.url},
            "data": {"path": str(data)},
        }
    )
    topics = Topics(federation)
    watcher = ScriptedConnection(
        broker.url,
        federation,
        subscriptions=[(topics.status("dev-1"), 1)],
        client_id=f"{federation}-watch",
    )
    statuses = watcher.agent_statuses
    fleet = InProcessFleet([settings])
    try:
        await watcher.connect(10)
        await fleet.start()
        await watcher.wait_until(lambda: any(s.state == "idle" for s in statuses), 10)
        fleet.crash("dev-1")
        assert not fleet.is_alive("dev-1")
        await watcher.wait_until(lambda: statuses[-1].state == "offline", 10)
        # The last will: its status was frozen before the agent connected, so it is older
        # than the agent's first status; a clean shutdown would have sent a fresh one.
        assert statuses[-1].ts <= statuses[0].ts
        await fleet.revive("dev-1")
        assert fleet.is_alive("dev-1")
        await watcher.wait_until(lambda: statuses[-1].state != "offline", 10)
        assert fleet.statistics()["dev-1"].connections == 1  # a new agent object
        assert fleet.failures() == []
    finally:
        await fleet.stop()
        try:
            # The revived agent's clean stop: stop() returns on its PUBACK, which may be
            # before the watcher has the message.
            await watcher.wait_until(
                lambda: statuses[-1].state == "offline" and statuses[-1].ts > statuses[0].ts, 10
            )
        finally:
            await watcher.disconnect()
