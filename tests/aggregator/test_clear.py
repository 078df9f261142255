"""Retained state of finished and abandoned federations, on a real Mosquitto.

Absence is proven, never waited for: every check subscribes to ``<root>/<federation>/#``
and reads until its own marker message comes back
(:func:`fedmq.transport.retained.retained_snapshot`), which the broker delivers only
after every retained message of the subscription.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aggregator.scripted import (
    ScriptedAgent,
    make_settings,
    random_delta,
    running_service,
    wait_released,
)
from fedmq import exit_codes
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.cli.clear_cmd import Retained
from fedmq.cli.commands import app
from fedmq.testing.scripted_clients import WAIT
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.mqtt import MqttSession
from fedmq.transport.retained import retained_snapshot
from fedmq.wire.blobs import blob_ref
from fedmq.wire.chunks import encode_blob_chunks
from fedmq.wire.control import AgentStatus, AggregatorStatus, RoundAnnouncement, encode_control
from fedmq.wire.topics import Topics

pytestmark = [pytest.mark.broker]


async def retained(broker: MosquittoBroker, federation: str) -> dict[str, bytes]:
    """Every retained message of the federation, as a fresh subscriber gets them."""
    topics = Topics(federation)
    settings = BrokerSettings(broker.url, f"probe-{time.monotonic_ns()}")
    async with retained_snapshot(
        settings, f"{topics.prefix}/#", f"probe/{settings.client_id}", timeout=WAIT
    ) as scan:
        return scan.messages


async def publish_retained(broker: MosquittoBroker, messages: Mapping[str, bytes]) -> None:
    session = MqttSession(BrokerSettings(broker.url, f"seed-{time.monotonic_ns()}"))
    task = asyncio.create_task(session.run(lambda message: asyncio.sleep(0)))
    try:
        await session.wait_connected(WAIT)
        for topic, payload in messages.items():
            await session.publish(topic, payload, retain=True)
    finally:
        task.cancel()


def clear(broker: MosquittoBroker, federation: str, *options: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, ["clear", "--broker", broker.url, "--federation", federation, *options]
    )
    return result.exit_code, result.stdout, result.stderr


def kinds(topics: Topics, messages: Mapping[str, bytes]) -> Retained:
    return Retained.sort(topics, messages)


@pytest.mark.slow
async def test_a_finished_federation_leaves_only_its_announcement_and_statuses(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    topics = Topics(federation)
    settings = make_settings(
        broker, federation, tmp_path / "state", round={"min_agents": 1, "target_updates": 1}
    )
    agent = await ScriptedAgent(broker, federation, "a").start()
    async with running_service(settings):
        opened = await agent.wait_round(1)
        assert any("/blob/" in topic for topic in await retained(broker, federation))
        await agent.wait_ack(await agent.send_update(1, random_delta(1)))
        await wait_released(agent, 1)
    await agent.stop()

    found = kinds(topics, await retained(broker, federation))
    assert found.announcement is not None
    announcement = RoundAnnouncement.model_validate_json(found.announcement[1])
    assert (announcement.status, announcement.bundle) == ("finished", opened.bundle)
    # Neither the bundle nor any parameter set is left: only the released inference
    # models ([delivery] publish_models), which devices may still install.
    assert announcement.models is not None
    assert announcement.models.latest is not None
    assert announcement.models.latest.checkpoint == 1
    released = {r.model.sha256 for r in (announcement.models.latest, announcement.models.best) if r}
    assert set(found.blobs) == released
    assert found.aggregator is not None  # its offline status, and the agent's
    assert sorted(found.agents) == ["a"]

    # What is left is cleared by `fedmq clear` (the aggregator says offline).
    code, out, err = await asyncio.to_thread(clear, broker, federation)
    assert code == 0, out + err
    assert f"cleared {topics.round()} (finished, round 1)" in out
    assert "cleared 1 agent statuses: a" in out
    assert await retained(broker, federation) == {}


def _leftovers(topics: Topics, state: str) -> dict[str, bytes]:
    """What an aggregator stopped mid-federation (or an old version) leaves retained."""
    now = time.time()
    messages: dict[str, bytes] = {}
    for seed in (b"bundle" * 700, b"params" * 300):
        ref = blob_ref(seed, 1024)
        for index, chunk in encode_blob_chunks(
            seed, ref, kind="blob", federation=topics.federation, sender="agg", round_id=3
        ):
            messages[topics.blob(ref.sha256, index)] = chunk
    messages[topics.round()] = encode_control(
        RoundAnnouncement(
            federation=topics.federation,
            aggregator="agg",
            round=3,
            issued_at=now,
            deadline=now + 60,
            bundle=blob_ref(b"bundle" * 700, 1024),
            params=blob_ref(b"params" * 300, 1024),
        )
    )
    messages[topics.aggregator_status()] = encode_control(
        AggregatorStatus(aggregator="agg", state=state, round=3, ts=now)  # type: ignore[arg-type]
    )
    for client, agent_state in (("a", "offline"), ("b", "idle")):
        messages[topics.status(client)] = encode_control(
            AgentStatus(client=client, state=agent_state, ts=now)  # type: ignore[arg-type]
        )
    messages[f"{topics.prefix}/notes/operator"] = b"not a fedmq topic"
    return messages


def test_clear_refuses_while_the_aggregator_runs_then_clears_with_force(
    broker: MosquittoBroker, federation: str
) -> None:
    topics = Topics(federation)
    leftovers = _leftovers(topics, "collecting")
    asyncio.run(publish_retained(broker, leftovers))

    code, _, err = clear(broker, federation)
    assert code == exit_codes.BUSY
    assert "the aggregator of" in err
    assert "'collecting'" in err
    assert asyncio.run(retained(broker, federation)) == leftovers  # nothing touched

    code, out, _ = clear(broker, federation, "--force", "--dry-run")
    assert code == 0
    assert "retained: blob" in out
    assert asyncio.run(retained(broker, federation)) == leftovers

    code, out, err = clear(broker, federation, "--force")
    assert code == 0, out + err
    blob_lines = [line for line in out.splitlines() if line.startswith("cleared blob")]
    assert len(blob_lines) == 2
    assert "cleared 2 agent statuses: a, b" in out
    assert f"left alone: {topics.prefix}/notes/operator (not a fedmq topic)" in out
    assert asyncio.run(retained(broker, federation)) == {
        f"{topics.prefix}/notes/operator": b"not a fedmq topic"
    }


def test_an_offline_aggregator_is_cleared_without_force(
    broker: MosquittoBroker, federation: str
) -> None:
    topics = Topics(federation)
    asyncio.run(publish_retained(broker, _leftovers(topics, "offline")))
    code, out, err = clear(broker, federation, "--root", "fedmq")
    assert code == 0, out + err
    assert set(asyncio.run(retained(broker, federation))) == {f"{topics.prefix}/notes/operator"}
    code, out, _ = clear(broker, federation)  # idempotent
    assert code == 0
    assert "left alone" in out


def test_nothing_to_clear_and_an_unreachable_broker(federation: str) -> None:
    result = CliRunner().invoke(
        app,
        ["clear", "--broker", "mqtt://127.0.0.1:1", "--federation", federation, "--timeout", "1"],
    )
    assert result.exit_code == exit_codes.RUNTIME_FAILURE
    assert "no connection" in result.stderr
    result = CliRunner().invoke(app, ["clear", "--broker", "http://x", "--federation", "f"])
    assert result.exit_code == exit_codes.CONFIG_ERROR
    result = CliRunner().invoke(
        app, ["clear", "--broker", "mqtt://x", "--federation", "f", "--ca-file", "/nonexistent"]
    )
    assert result.exit_code == exit_codes.CONFIG_ERROR
    assert "ca_file" in result.stderr


def test_live_agents_are_told_apart_from_what_was_left_behind() -> None:
    topics = Topics("f")
    found = Retained.sort(topics, _leftovers(topics, "offline"))
    assert found.live_agents() == ["b"]  # idle: a running agent republishes its status
    assert found.running_aggregator() is None
    assert len(found.clearable()) == sum(map(len, found.blobs.values())) + 4
    busy = Retained.sort(topics, _leftovers(topics, "waiting"))
    assert busy.running_aggregator() == "its status says 'waiting' (round 3)"
