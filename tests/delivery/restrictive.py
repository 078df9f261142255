"""A federation on a plant-like broker: a 128 KB packet cap, a small queue, a big model.

Shared by the test (tests/delivery/test_restrictive_broker.py) and the benchmark
(bench/delivery.py): ten real agents train a 1.1M-parameter MLP (compiled here with
torch) through a Mosquitto whose limits are those of the plant report in the delivery
issue, or through an unrestricted one for the comparison.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.helpers import running_agent, write_digits
from aggregator.scripted import records, running_service, wait_for

from edge_agent.config import parse_settings
from fedmq.aggregator.config import load_settings
from fedmq.aggregator.statistics import AggregatorStatistics
from fedmq.broker.mosquitto import MosquittoBroker, MosquittoConfig
from fedmq.coordinator.records import RoundRecord

AGENTS = 10
HIDDEN = 1000  # 64 -> 1000 -> 1000 -> 10: 1,077,010 parameters
RESTRICTIVE = {"max_packet_size": 131072, "max_queued_messages": 200, "max_inflight_messages": 20}
UNRESTRICTED: dict[str, int] = {}


def big_mlp_bundle(directory: Path) -> Path:
    """Compile the 1.1M-parameter MLP into ``directory`` (once; reused if present)."""
    if (directory / "manifest.json").is_file():
        return directory
    import torch
    from torch import nn

    from fedmq.compile import compile_module

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )
    bundle = compile_module(model, input_shape=(64,), loss="cross_entropy", name="big_mlp")
    bundle.write(directory)
    return directory


@dataclass(frozen=True)
class Outcome:
    """What a run produced."""

    rounds: list[RoundRecord]
    statistics: AggregatorStatistics

    @property
    def durations(self) -> list[float]:
        return [r.closed_at - r.opened_at for r in self.rounds]


def broker_config(limits: dict[str, int]) -> MosquittoConfig:
    return MosquittoConfig(**limits)  # type: ignore[arg-type]


async def federation(
    broker: MosquittoBroker,
    bundle: Path,
    work: Path,
    federation_id: str,
    rounds: int = 3,
    *,
    queue: int | None = None,
) -> Outcome:
    """Run ``rounds`` rounds of ten real agents; return the round records.

    ``queue`` is the broker's ``max_queued_messages`` as the aggregator is told it
    (``[broker] max_queued_messages``: uploads are paced to fit); None paces nothing.
    """
    broker_table: dict[str, Any] = {"url": broker.url}
    if queue is not None:
        broker_table["max_queued_messages"] = queue
    data = write_digits(work / "data")
    settings = load_settings(
        None,
        federation=federation_id,
        bundle=str(bundle),
        state_dir=str(work / "state"),
        rounds=rounds,
        broker=broker_table,
        settle_s=0.3,
        status_interval_s=0.2,
        heartbeat_s=1.0,
        exit_when_finished=False,
        round={"deadline_s": 50.0, "min_agents": AGENTS},
        training={"epochs": 1, "batch_size": 32, "lr": 0.05},
    )
    agents: list[dict[str, Any]] = [
        {
            "client_id": f"press-{i:02d}",
            "federation": federation_id,
            "state_dir": str(work / f"agent-{i}"),
            "heartbeat_s": 1.0,
            "broker": {"url": broker.url},
            "data": {"path": str(data)},
            "limits": {"round_retry_s": 0.5},
            "outbox": {"ack_timeout_s": 60.0},
        }
        for i in range(AGENTS)
    ]
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(running_service(settings))
        for document in agents:
            await stack.enter_async_context(running_agent(parse_settings(document)))
        await wait_for(lambda: service.statistics().rounds_closed >= rounds, timeout=240)
        statistics = service.statistics()
    return Outcome(records(settings.state_dir)[:rounds], statistics)
