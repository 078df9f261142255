"""Rounds against a real Mosquitto with scripted agents: target, deadline, extension,
dropouts (last will, missed heartbeats), a burst of 50 updates, async FedBuff, broker restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aggregator.scripted import (
    DeviceProcess,
    ScriptedAgent,
    checkpoint_params,
    fedavg,
    make_settings,
    random_delta,
    read_status,
    records,
    running_service,
    update_shapes,
    wait_for,
)
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.testing.scripted_clients import SCRIPTED_CHUNK, ScriptedClients

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def _agents(
    broker: MosquittoBroker, federation: str, *names: str, **kw: float
) -> list[ScriptedAgent]:
    return [await ScriptedAgent(broker, federation, name, **kw).start() for name in names]


async def _stop(agents: list[ScriptedAgent]) -> None:
    for agent in agents:
        await agent.stop()


async def test_a_round_closes_at_the_target(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker,
        federation,
        state,
        exit_when_finished=False,  # stay up to answer the late update
        round={"min_agents": 3, "target_updates": 2},
    )
    a, b, c = await _agents(broker, federation, "a", "b", "c")
    async with running_service(settings):
        announcement = await a.wait_round(1)
        assert announcement.selected == ["a", "b", "c"]
        base = await a.fetch_params(announcement)
        ua = await a.send_update(1, random_delta(1), examples=100)
        ub = await b.send_update(1, random_delta(2), examples=300)
        assert (await a.wait_ack(ua)).reason == "accepted"
        assert (await b.wait_ack(ub)).reason == "accepted"
        finished = await a.wait_round(1, "finished")
        final = checkpoint_params(state, finished)
        late = await c.send_update(1, random_delta(3))
        assert (await c.wait_ack(late)).reason == "round_closed"
    expected = fedavg(base, [(100, random_delta(1)), (300, random_delta(2))])
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-7)
    [record] = records(state)
    assert (record.outcome, record.reason) == ("closed", "target")
    assert sorted(c.client for c in record.contributions) == ["a", "b"]  # any order: two senders
    assert (await read_status(broker, federation)).state == "offline"  # stopped cleanly
    await _stop([a, b, c])


async def test_a_round_closes_at_the_deadline_with_quorum(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker, federation, state, round={"min_agents": 3, "min_updates": 2, "deadline_s": 1.5}
    )
    agents = await _agents(broker, federation, "a", "b", "c")  # c stays online, never sends
    async with running_service(settings):
        await agents[0].wait_round(1)
        for seed, agent in enumerate(agents[:2]):
            await agent.wait_ack(await agent.send_update(1, random_delta(seed)))
        await agents[0].wait_round(1, "finished")
    [record] = records(state)
    assert (record.outcome, record.reason) == ("closed", "deadline")
    assert len(record.contributions) == 2
    await _stop(agents)


async def test_below_quorum_a_round_is_extended_once_then_fails(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker,
        federation,
        state,
        rounds=2,
        round={"min_agents": 2, "min_updates": 2, "deadline_s": 1.0, "extension_s": 1.0},
    )
    a, b = await _agents(broker, federation, "a", "b")
    async with running_service(settings):
        first = await a.wait_round(1)
        await a.wait_ack(await a.send_update(1, random_delta(1)))
        second = await a.wait_round(2)
        deadlines = {r.deadline for r in a.rounds if r.round == 1 and r.status == "open"}
        assert len(deadlines) == 2  # announced again with the extended deadline
        assert second.params == first.params  # the failed round left the model alone
        for seed, agent in enumerate((a, b)):
            await agent.wait_ack(await agent.send_update(2, random_delta(seed)))
        await a.wait_round(2, "finished")
    failed, closed = records(state)
    assert (failed.outcome, failed.reason, failed.extended) == ("failed", "no_quorum", True)
    assert (closed.outcome, closed.reason) == ("closed", "target")
    await _stop([a, b])


async def test_an_agent_killed_mid_round_is_not_waited_for(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker, federation, state, round={"min_agents": 3, "min_updates": 2, "deadline_s": 600}
    )
    device = DeviceProcess(broker, federation, "c")  # a real process holding c's connection
    a, b = await _agents(broker, federation, "a", "b")
    try:
        async with running_service(settings):
            announcement = await a.wait_round(1)
            assert announcement.selected == ["a", "b", "c"]
            for seed, agent in enumerate((a, b)):
                await agent.wait_ack(await agent.send_update(1, random_delta(seed)))
            assert not any(r.status == "finished" for r in a.rounds)  # still waiting for c
            device.kill()  # kill -9: the broker publishes c's last will
            await a.wait_round(1, "finished")  # long before the 600 s deadline
    finally:
        device.kill()
    [record] = records(state)
    assert (record.outcome, record.reason) == ("closed", "dropouts")
    await _stop([a, b])


async def test_an_agent_whose_heartbeats_stop_is_not_waited_for(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker, federation, state, round={"min_agents": 3, "min_updates": 2, "deadline_s": 600}
    )
    a, b = await _agents(broker, federation, "a", "b")
    (c,) = await _agents(broker, federation, "c", heartbeat_s=0.3)
    async with running_service(settings):
        await a.wait_round(1)
        for seed, agent in enumerate((a, b)):
            await agent.wait_ack(await agent.send_update(1, random_delta(seed)))
        c.silence()  # connected, but its heartbeats stop (a hung device)
        await a.wait_round(1, "finished")
    assert records(state)[0].reason == "dropouts"
    await _stop([a, b, c])


AGENTS_IN_BURST = 50


async def test_a_burst_of_50_updates_in_one_second_is_all_accepted(
    make_broker: Callable[..., MosquittoBroker], federation: str, tmp_path: Path
) -> None:
    # Mosquitto silently drops QoS 1 messages queued for a subscriber beyond
    # max_queued_messages (default 1000) or max_queued_bytes, while the publisher still
    # gets its PUBACK. Size both with the rule of broker_config/README.md: twice
    # agents x chunks (bytes) per update, for one round of backlog.
    update_bytes = sum(int(np.prod(s)) for s in update_shapes().values()) * 4 + 4096
    chunks_per_update = -(-update_bytes // SCRIPTED_CHUNK)
    broker = make_broker(
        max_inflight_messages=20,  # Mosquitto's default: the rest of a burst is queued
        max_queued_messages=2 * AGENTS_IN_BURST * chunks_per_update,
        max_queued_bytes=2 * AGENTS_IN_BURST * update_bytes,
    )
    state = tmp_path / "state"
    clients = [f"dev-{i:02d}" for i in range(AGENTS_IN_BURST)]
    settings = make_settings(
        broker, federation, state, round={"min_agents": AGENTS_IN_BURST, "deadline_s": 600}
    )
    fleet = await ScriptedClients(broker.url, federation, clients).start()
    try:
        async with running_service(settings) as service:
            await wait_for(lambda: any(r.round == 1 and r.status == "open" for r in fleet.rounds))
            uids = await asyncio.gather(
                *(
                    fleet.send(client, 1, random_delta(i), examples=10 + i)
                    for i, client in enumerate(clients)
                )
            )
            await wait_for(lambda: len(fleet.acks) >= AGENTS_IN_BURST)
            assert {a.update_id for a in fleet.acks} == set(uids)
            assert all(a.accepted and a.reason == "accepted" for a in fleet.acks)
            await wait_for(lambda: any(r.status == "finished" for r in fleet.rounds))
            assert service.statistics().updates_accepted == AGENTS_IN_BURST
    finally:
        await fleet.stop()
    [record] = records(state)
    assert len({c.client for c in record.contributions}) == AGENTS_IN_BURST
    assert record.reason == "target"


async def test_async_mode_makes_a_version_every_k_updates(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker,
        federation,
        state,
        mode="async",
        rounds=2,
        fedbuff={"buffer_size": 2, "max_staleness": 1},
    )
    a, b, c = await _agents(broker, federation, "a", "b", "c")
    async with running_service(settings):
        v1 = await a.wait_round(1)
        assert (v1.mode, v1.selected) == ("async", None)
        await a.wait_ack(await a.send_update(1, random_delta(1)))
        await b.wait_ack(await b.send_update(1, random_delta(2)))
        await a.wait_round(2)
        stale = await c.send_update(1, random_delta(3), examples=50)  # trained on version 1
        assert (await c.wait_ack(stale)).reason == "accepted"
        await a.wait_ack(await a.send_update(2, random_delta(4), examples=50))
        await a.wait_round(2, "finished")
    second = records(state)[1]
    assert [(x.client, x.staleness) for x in second.contributions] == [("c", 1), ("a", 0)]
    assert second.contributions[0].weight == pytest.approx(50 / np.sqrt(2))
    await _stop([a, b, c])


async def test_a_broker_restart_mid_round_loses_nothing(
    make_broker: Callable[..., MosquittoBroker], federation: str, tmp_path: Path
) -> None:
    broker = make_broker()  # no persistence: a restart loses every retained blob
    state = tmp_path / "state"
    # The restart fires both agents' last wills; the grace lets them come back.
    settings = make_settings(
        broker, federation, state, dropout_grace_s=30.0, round={"min_agents": 2}
    )
    a, b = await _agents(broker, federation, "a", "b")
    async with running_service(settings):
        await a.wait_round(1)
        await a.wait_ack(await a.send_update(1, random_delta(1)))
        broker.restart()
        # The agents reconnect and say online again; the aggregator republishes the
        # retained announcement and blobs, so a fresh subscriber can still download.
        await a.publish_status()
        await b.publish_status()
        fresh = await ScriptedAgent(broker, federation, "observer").start()
        announcement = await fresh.wait_round(1)
        params = await fresh.fetch_params(announcement)
        assert set(params) >= set(random_delta(0))
        await b.wait_ack(await b.send_update(1, random_delta(2)))
        await a.wait_round(1, "finished")
        await fresh.stop()
    [record] = records(state)
    assert [c.client for c in record.contributions] == ["a", "b"]
    await _stop([a, b])
