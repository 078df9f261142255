"""Helpers for end-to-end simulation tests: FedAvg from recorded updates, process checks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from fedmq.aggregator.store import read_records
from fedmq.bundle import Bundle
from fedmq.coordinator.records import RoundRecord
from fedmq.wire.tensors import decode_tensors
from fedmq.wire.update import decode_update


def checkpoint(state_dir: Path, round_id: int) -> dict[str, np.ndarray]:
    return decode_tensors((state_dir / "checkpoints" / f"{round_id:06d}.params").read_bytes())


def check_fedavg(report: Path, bundle_dir: Path) -> list[RoundRecord]:
    """Recompute every round's model from the updates seen on the wire, in numpy.

    ``new = old + sum(w_i * delta_i) / sum(w_i)`` over the round's contributions (their
    weights as recorded), compared with the aggregator's checkpoint of the round.
    """
    state = report / "aggregator"
    updates = report / "updates"
    records = list(read_records(state))
    update_names = set(Bundle.load(bundle_dir).manifest.update_names)
    for record in records:
        base = checkpoint(state, record.round - 1)
        sums: dict[str, np.ndarray] = {}
        total = 0.0
        for contribution in record.contributions:
            path = (
                updates
                / f"{record.round:06d}"
                / f"{contribution.client}@{contribution.update_id}.update"
            )
            meta, delta = decode_update(path.read_bytes())
            assert meta.num_examples == contribution.examples
            assert set(delta) == update_names
            for name, value in delta.items():
                sums[name] = sums.get(name, 0.0) + contribution.weight * value.astype(np.float64)
            total += contribution.weight
        got = checkpoint(state, record.round)
        assert set(got) == set(base)
        for name, value in got.items():
            if name in sums:
                expected = base[name].astype(np.float64) + sums[name] / total
                np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(value, base[name])
    return records


def alive(pids: Iterable[int]) -> list[int]:
    """The pids that still run (zombies count as gone: they have exited)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def descendants(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@dataclass
class Watched:
    """A command run to completion while its child processes were sampled."""

    returncode: int
    stdout: str
    stderr: str
    children: set[int] = field(default_factory=set)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fedmq.cli.app import main; main()", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("FEDMQ_", "NOTIFY_"))}


def run_watching(
    command: list[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    when: Callable[[str], bool] | None = None,
    then: Callable[[subprocess.Popen[str]], None] | None = None,
    env: dict[str, str] | None = None,
) -> Watched:
    """Run ``command``, recording every descendant process seen while it runs.

    ``then(process)`` is called once stderr has shown a line for which ``when`` holds.
    ``env`` adds variables to the clean environment (no ``FEDMQ_*`` of ours).
    """
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**clean_env(), **(env or {})},
    ) as process:
        children: set[int] = set()
        stderr_lines: list[str] = []
        triggered = threading.Event()

        def read_stderr() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                stderr_lines.append(line)
                if when is not None and not triggered.is_set() and when(line):
                    triggered.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        fired = False
        while process.poll() is None:
            children |= descendants(process.pid)
            if triggered.is_set() and not fired and then is not None:
                fired = True
                then(process)
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(
                    f"{command} did not finish in {timeout} s: {''.join(stderr_lines)}"
                )
            time.sleep(0.05)
        assert process.stdout is not None
        stdout = process.stdout.read()
        reader.join(5)
    return Watched(process.returncode, stdout, "".join(stderr_lines), children)
