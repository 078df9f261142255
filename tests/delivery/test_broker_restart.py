"""A restrictive broker restarting mid-upload: the round recovers within its deadline."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent.helpers import running_agent
from aggregator.scripted import make_settings, records, running_service, wait_for

from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.broker, pytest.mark.slow]

AGENTS = 4
QUEUE = 30  # messages: with 1 KiB chunks a digits-MLP update is ~20, so one at a time


async def test_a_broker_restart_mid_upload_recovers_without_an_ack_timeout(
    make_broker: Callable[..., MosquittoBroker],
    federation: str,
    tmp_path: Path,
    make_settings_agent: Callable[..., AgentSettings],
) -> None:
    broker = make_broker(
        persistence=True, max_packet_size=131072, max_queued_messages=QUEUE, max_inflight_messages=5
    )
    settings = make_settings(
        broker,
        federation,
        tmp_path / "state",
        chunk_size=1024,
        # The restart fires every agent's last will: the grace lets them come back.
        dropout_grace_s=30.0,
        round={"deadline_s": 40.0, "min_agents": AGENTS},
    )
    # The aggregator knows the queue limit ([broker] max_queued_messages): uploads are paced.
    broker_table = settings.broker.model_copy(update={"max_queued_messages": QUEUE})
    settings = settings.model_copy(update={"broker": broker_table})
    agents = [
        make_settings_agent(
            broker.url,
            f"press-{i}",
            # An ack timeout far past the deadline: if recovery waited for it, the round
            # would end at its deadline instead of by target.
            outbox={"ack_timeout_s": 600.0},
        )
        for i in range(AGENTS)
    ]
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(running_service(settings))
        for document in agents:
            await stack.enter_async_context(running_agent(document))
        await wait_for(lambda: service.statistics().bytes_in > 0, timeout=60, interval=0.005)
        accepted_before = service.statistics().updates_accepted
        restarted = time.monotonic()
        broker.restart()  # synchronous: agents and aggregator are frozen mid-upload
        await wait_for(lambda: service.statistics().rounds_closed >= 1, timeout=60)
        recovered = time.monotonic() - restarted
        statistics = service.statistics()
    record = records(settings.state_dir)[0]
    print(f"restart -> round closed: {recovered:.1f} s; {statistics.upload_grants} grants")
    assert accepted_before < AGENTS  # the restart came mid-round, uploads under way
    assert statistics.connections >= 2
    assert record.outcome == "closed"
    assert record.reason in ("target", "all_reported")
    assert not record.extended
    assert sorted(c.client for c in record.contributions) == [f"press-{i}" for i in range(AGENTS)]
