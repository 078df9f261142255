"""Hostile and broken updates through a real broker: each is refused with its reason,
counted in the retained status, and the round still completes with the good ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.scripted import (
    ScriptedAgent,
    make_settings,
    random_delta,
    read_status,
    records,
    running_service,
    wait_for,
)
from fedmq.broker.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_bad_updates_are_rejected_with_reasons_while_the_round_completes(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker,
        federation,
        state,
        exit_when_finished=False,
        round={"min_agents": 3, "min_updates": 2, "deadline_s": 600},
    )
    good, other, bad = [
        await ScriptedAgent(broker, federation, name).start() for name in ("good", "other", "bad")
    ]
    stranger = await ScriptedAgent(broker, federation, "stranger").start(announce=False)
    async with running_service(settings):
        await good.wait_round(1)

        async def expect(uid: str, reason: str) -> None:
            ack = await bad.wait_ack(uid)
            assert (ack.accepted, ack.reason) == (False, reason), ack.detail

        shapes = random_delta(0)
        nan = {k: np.full_like(v, np.nan) for k, v in shapes.items()}
        wrong = {k: np.zeros((3, 3), np.float32) for k in shapes}
        await expect(await bad.send_update(1, nan), "non_finite")
        await expect(await bad.send_update(1, wrong), "wrong_shape")
        await expect(await bad.send_update(7, shapes), "future_round")
        uid, envelope = bad.envelope(1, shapes)
        await bad.send_bytes(1, envelope[: len(envelope) // 2], uid)  # a truncated envelope
        await expect(uid, "malformed")
        uid, envelope = bad.envelope(1, shapes, federation="elsewhere")
        await bad.send_bytes(1, envelope, uid, federation="elsewhere")
        await expect(uid, "wrong_federation")
        # No update id to answer: garbage on the topic, and chunks signed by someone else.
        await bad.session.publish(bad.topics.update("bad", 1, 0), b"\x00garbage", qos=1)
        uid, envelope = bad.envelope(1, shapes)
        await bad.send_bytes(1, envelope, uid, sender="good")
        # Chunks that name no answerable update are counted one per message.
        spoofed = -(-len(envelope) // bad.chunk_size)
        malformed = 2 + spoofed
        await wait_for(lambda: bad.rejected().get("malformed", 0) >= malformed)

        unknown = await stranger.send_update(1, shapes)
        assert (await stranger.wait_ack(unknown)).reason == "unknown_client"

        first = await good.send_update(1, random_delta(1), examples=10)
        assert (await good.wait_ack(first)).reason == "accepted"
        uid, envelope = good.envelope(1, random_delta(1), update_id=first, examples=10)
        await good.send_bytes(1, envelope, uid)  # a replay of an accepted update
        replay = await good.wait_ack(first, count=2)
        assert (replay.accepted, replay.reason) == (True, "duplicate")
        await other.wait_ack(await other.send_update(1, random_delta(2), examples=30))
        await good.wait_round(1, "finished")
        status = await read_status(broker, federation, until=lambda s: s.state == "finished")
    [record] = records(state)
    assert (record.outcome, record.reason) == ("closed", "all_reported")
    assert [(c.client, c.examples) for c in record.contributions] == [("good", 10), ("other", 30)]
    expected = {
        "non_finite": 1,
        "wrong_shape": 1,
        "future_round": 1,
        "malformed": malformed,
        "wrong_federation": 1,
        "unknown_client": 1,
    }
    assert record.rejected == expected
    assert (status.state, status.received, status.rejected) == ("finished", 2, expected)
    for agent in (good, other, bad, stranger):
        await agent.stop(offline=agent is not stranger)
