"""A state directory that refuses writes: updates are not acked, the round change stops the
service with a state error, and a restart finishes the round from what was stored."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from aggregator.scripted import (
    WAIT,
    ScriptedAgent,
    make_settings,
    random_delta,
    records,
    running_service,
    wait_for,
)
from fedmq.aggregator.service import AggregatorService
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import StateError
from fedmq.timeouts import within

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_write_failures_never_ack_and_stop_the_service_cleanly(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(broker, federation, state, round={"min_agents": 1})
    agent = await ScriptedAgent(broker, federation, "a").start()
    service = AggregatorService(settings)
    run = asyncio.create_task(service.run())
    await service.wait_started()
    await agent.wait_round(1)

    (state / "rounds").write_bytes(b"")  # updates cannot be stored under a file
    uid, envelope = agent.envelope(1, random_delta(1))
    await agent.send_bytes(1, envelope, uid)
    await wait_for(lambda: agent.rejected().get("persist_failed", 0) >= 1)
    assert [a for a in agent.acks if a.update_id == uid] == []  # never acked

    (state / "rounds").unlink()
    (state / "rounds" / "000001" / "record.json").mkdir(parents=True)  # the close cannot write
    await agent.send_bytes(1, envelope, uid)  # the agent's re-send after its ack timeout
    ack = await agent.wait_ack(uid)
    assert ack.reason == "accepted"  # stored durably before the failure
    with pytest.raises(StateError, match="state directory"):
        await within(run, WAIT)

    shutil.rmtree(state / "rounds" / "000001" / "record.json")
    async with running_service(settings):  # the restart closes the round from disk
        await agent.wait_round(1, "finished")
    [record] = records(state)
    assert [(c.client, c.update_id) for c in record.contributions] == [("a", uid)]
    await agent.stop()
