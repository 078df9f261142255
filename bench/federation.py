"""Whole-federation benchmark: `fedmq simulate` runs against issue 6's targets.

Run: ``.venv/bin/python bench/federation.py`` (``--quick`` for a smoke run,
``--only NAME`` for one measurement).  Each measurement is a real simulation — a
private Mosquitto, the in-process aggregator, real agents running onnxruntime — and
prints its figure beside its target and, where one exists, a baseline measured in the
same run:

1. ``accuracy``: digits MLP, 10 agents, Dirichlet(0.5) label skew, 20 rounds, FedAvg:
   final test accuracy (target >= 95 %) beside centralised training of the same bundle
   with the same local settings on the union of the agents' data;
2. ``round_time``: per-round wall time (announcement to close) with 5 subprocess agents
   and one local epoch (target <= 1 s);
3. ``dropout``: 5 subprocess agents, one killed (``kill -9``) as each round opens: how
   long after the last live agent's accepted update the round closes (target <= 1 s);
4. ``fleet_200``: 200 in-process agents complete 5 rounds (target: completes);
5. ``fleet_1000``: 1000 in-process agents with a tiny model (the 4810-parameter digits
   MLP, one local step) complete one round (target: completes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.bundle import Bundle
from fedmq.datasets.digits import load_digits_split
from fedmq.runtime.trainer import Trainer
from fedmq.simulate import Simulation, SimulationOptions, SimulationResult, TrainingOverrides
from fedmq.simulate.options import parse_partition
from fedmq.simulate.workloads import BUILTIN_TRAINING, builtin_bundle_dir
from fedmq.wire.training import TrainingConfig


@dataclass
class Figure:
    name: str
    result: str
    target: str
    ok: bool
    baseline: str = ""


FIGURES: list[Figure] = []


def report(figure: Figure) -> None:
    FIGURES.append(figure)
    mark = "ok  " if figure.ok else "MISS"
    baseline = f"   [{figure.baseline}]" if figure.baseline else ""
    print(
        f"{mark} {figure.name:<12} {figure.result:<44} target {figure.target}{baseline}", flush=True
    )


async def simulate(work: Path, name: str, **options: Any) -> tuple[SimulationResult, float]:
    started = time.perf_counter()
    result = await Simulation(
        SimulationOptions(broker="mosquitto", out=work / name, **options), log_level="WARNING"
    ).run()
    return result, time.perf_counter() - started


def centralised_accuracy(epochs: int) -> float:
    """The same bundle and local settings, trained on all the agents' data at once."""
    bundle = Bundle.load(builtin_bundle_dir("digits_mlp"))
    trainer = Trainer(bundle)
    train, test = load_digits_split()
    config = TrainingConfig(**{**BUILTIN_TRAINING["digits_mlp"], "epochs": epochs})
    result = trainer.train(bundle.initial_parameters(), train.x, train.y, config)
    params = {
        name: value + result.delta[name] if name in result.delta else value
        for name, value in bundle.initial_parameters().items()
    }
    return trainer.evaluate(params, test.x, test.y)["accuracy"]


async def bench_accuracy(work: Path, quick: bool) -> None:
    rounds = 5 if quick else 20
    result, seconds = await simulate(
        work, "accuracy", agents=10, rounds=rounds, partition=parse_partition("dirichlet:0.5")
    )
    accuracy = result.rows[-1].test_accuracy or 0.0
    # Centralised: as many passes over the data as one agent makes over its own share.
    central = centralised_accuracy(BUILTIN_TRAINING["digits_mlp"]["epochs"] * rounds)
    report(
        Figure(
            "accuracy",
            f"{accuracy:.2%} after {rounds} rounds ({seconds:.1f} s)",
            ">= 95 %",
            accuracy >= 0.95,
            f"centralised {central:.2%}, ratio {accuracy / central:.3f}",
        )
    )


async def bench_round_time(work: Path, quick: bool) -> None:
    rounds = 5 if quick else 10
    result, _ = await simulate(
        work,
        "round_time",
        agents=5,
        rounds=rounds,
        processes=True,
        training=TrainingOverrides(epochs=1),
    )
    times = [row.wall_time_s for row in result.rows]
    median, worst = statistics.median(times), max(times)
    report(
        Figure(
            "round_time",
            f"median {median * 1000:.0f} ms, max {worst * 1000:.0f} ms ({rounds} rounds)",
            "<= 1 s",
            worst <= 1.0,
            f"first round {times[0] * 1000:.0f} ms (bundle download)",
        )
    )


async def bench_dropout(work: Path, quick: bool) -> None:
    rounds = 3 if quick else 5
    result, _ = await simulate(
        work,
        "dropout",
        agents=5,
        rounds=rounds,
        processes=True,
        drop_rate=0.2,
        training=TrainingOverrides(epochs=1),
    )
    lags = [row.close_lag_s for row in result.rows if row.close_lag_s is not None]
    dropped = [row.dropped_agents for row in result.rows]
    worst = max(lags) if lags else float("inf")
    report(
        Figure(
            "dropout",
            f"closes {statistics.median(lags) * 1000:.0f} ms (max {worst * 1000:.0f} ms) "
            f"after the last update",
            "<= 1 s",
            worst <= 1.0 and all(d == 1 for d in dropped),
            f"killed per round {dropped}, reasons {sorted({r.reason for r in result.rows})}",
        )
    )


async def bench_fleet(work: Path, agents: int, rounds: int, **options: Any) -> None:
    result, seconds = await simulate(
        work, f"fleet_{agents}", agents=agents, rounds=rounds, **options
    )
    complete = len(result.rows) == rounds and all(
        row.outcome == "closed" and row.updates_accepted == agents for row in result.rows
    )
    per_round = statistics.median(row.wall_time_s for row in result.rows)
    report(
        Figure(
            f"fleet_{agents}",
            f"{rounds} rounds in {seconds:.1f} s, {per_round:.1f} s per round",
            "completes",
            complete,
            f"peak RSS of this process so far {_peak_rss_mib():.0f} MiB",
        )
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and agents")
    parser.add_argument(
        "--only",
        choices=["accuracy", "round_time", "dropout", "fleet_200", "fleet_1000"],
        action="append",
    )
    args = parser.parse_args()
    print(json.dumps({"cpus": os.cpu_count(), "quick": args.quick}), flush=True)
    quick = args.quick
    big = 200 if not quick else 50
    huge = 1000 if not quick else 100
    benches: dict[str, Callable[[Path], Coroutine[Any, Any, None]]] = {
        "accuracy": lambda w: bench_accuracy(w, quick),
        "round_time": lambda w: bench_round_time(w, quick),
        "dropout": lambda w: bench_dropout(w, quick),
        "fleet_200": lambda w: bench_fleet(w, big, 5),
        "fleet_1000": lambda w: bench_fleet(
            w, huge, 1, training=TrainingOverrides(epochs=1, batch_size=64)
        ),
    }
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-") as work:
        for name, bench in benches.items():
            if args.only and name not in args.only:
                continue
            asyncio.run(bench(Path(work)))
    missed = [f.name for f in FIGURES if not f.ok]
    print(
        f"{len(FIGURES) - len(missed)} of {len(FIGURES)} targets met"
        + (f"; missed: {missed}" if missed else "")
    )


if __name__ == "__main__":
    main()
