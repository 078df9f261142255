"""Ten agents, a 1.1M-parameter model, a broker with a 128 KB cap and a 200-message queue."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from delivery.restrictive import AGENTS, RESTRICTIVE, big_mlp_bundle, federation
from fedmq.broker.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.compile]


async def test_auto_chunks_and_paced_uploads_close_every_round_by_target(
    make_broker: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    broker = make_broker(**RESTRICTIVE)
    bundle = big_mlp_bundle(tmp_path / "big_mlp")
    outcome = await federation(
        broker,
        bundle,
        tmp_path / "run",
        f"t{uuid.uuid4().hex[:10]}",
        queue=RESTRICTIVE["max_queued_messages"],
    )
    # 33 chunks per update, 10 agents, a 200-message queue: 5 upload at once, and the
    # other 5 wait for a slot rather than overflow the queue.
    assert outcome.statistics.upload_grants >= 3 * AGENTS
    print(f"resend requests: {outcome.statistics.resend_requests}")
    for record in outcome.rounds:
        assert record.outcome == "closed"
        assert record.reason in ("target", "all_reported")  # not the deadline
        assert len(record.contributions) == AGENTS  # no update lost
        assert not record.extended  # within the 50 s deadline: no 60 s ack-timeout stall
