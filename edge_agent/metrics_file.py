"""The agent's Prometheus metrics as a node_exporter textfile (``[metrics] textfile``).

node_exporter's textfile collector reads ``*.prom`` files from one directory at every
scrape; the agent rewrites its file after every round, every minute while idle and when
it stops, atomically (:func:`fedmq.durable_files.write_file`: a hidden temporary name,
then a rename), so a scrape never sees half a file.  The text format is written here by
hand, a few lines: the device install does not carry prometheus-client.  Every sample is
labelled with the agent's ``client`` and ``federation``, so several agents on one host
(or one collector directory) never collide.  The metrics are listed in
``docs/operations.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import fedmq
from fedmq.durable_files import write_file


@dataclass(frozen=True)
class Sample:
    """One metric family with a single sample (the agent has no per-label series)."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    value: float


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(samples: Iterable[Sample], labels: Mapping[str, str]) -> str:
    """The Prometheus text exposition format (version 0.0.4) of ``samples``."""
    label_text = ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items())
    braces = f"{{{label_text}}}" if label_text else ""
    lines: list[str] = []
    for sample in samples:
        lines.append(f"# HELP {sample.name} {_escape_help(sample.help)}")
        lines.append(f"# TYPE {sample.name} {sample.kind}")
        lines.append(f"{sample.name}{braces} {_number(sample.value)}")
    return "\n".join(lines) + "\n"


@dataclass
class RoundTimes:
    """What the textfile reports about training that the agent's counters do not hold."""

    training_seconds: float = 0.0  # total, over every trained round
    last_training_seconds: float | None = None
    last_round_end: float | None = None  # unix time the last round trained or failed


@dataclass(frozen=True)
class AgentFigures:
    """The agent's numbers at one moment (gathered by the round runner)."""

    rounds_trained: int
    rounds_failed: int
    updates_acked: int
    updates_dropped: int
    bytes_sent: int
    bytes_received: int
    connections: int
    last_round: int | None
    times: RoundTimes


def agent_samples(figures: AgentFigures) -> list[Sample]:
    """The agent's metric families (names follow Prometheus conventions)."""
    times = figures.times
    samples = [
        Sample("fedmq_agent_info", "gauge", "The agent (value 1; version in the label)", 1),
        Sample(
            "fedmq_agent_rounds_trained_total",
            "counter",
            "Rounds trained and committed since the agent started",
            figures.rounds_trained,
        ),
        Sample(
            "fedmq_agent_rounds_failed_total",
            "counter",
            "Round attempts that failed (data, bundle, download, disk) since the agent started",
            figures.rounds_failed,
        ),
        Sample(
            "fedmq_agent_training_seconds_total",
            "counter",
            "Time spent training (and evaluating, encoding) since the agent started",
            times.training_seconds,
        ),
        Sample(
            "fedmq_agent_updates_acked_total",
            "counter",
            "Updates the aggregator acknowledged since the agent started",
            figures.updates_acked,
        ),
        Sample(
            "fedmq_agent_updates_dropped_total",
            "counter",
            "Updates dropped unacknowledged (refused, too old, federation finished)",
            figures.updates_dropped,
        ),
        Sample(
            "fedmq_agent_bytes_sent_total",
            "counter",
            "MQTT payload bytes published (update chunks, statuses) since the agent started",
            figures.bytes_sent,
        ),
        Sample(
            "fedmq_agent_bytes_received_total",
            "counter",
            "MQTT payload bytes received (announcements, blob chunks, acks)",
            figures.bytes_received,
        ),
        Sample(
            "fedmq_agent_reconnects_total",
            "counter",
            "Broker reconnections since the agent started (connections after the first)",
            max(0, figures.connections - 1),
        ),
    ]
    if figures.last_round is not None:
        samples.append(
            Sample(
                "fedmq_agent_last_round",
                "gauge",
                "The last round this agent answered",
                figures.last_round,
            )
        )
    if times.last_training_seconds is not None:
        samples.append(
            Sample(
                "fedmq_agent_last_training_seconds",
                "gauge",
                "Training time of the last trained round",
                times.last_training_seconds,
            )
        )
    if times.last_round_end is not None:
        samples.append(
            Sample(
                "fedmq_agent_last_round_timestamp_seconds",
                "gauge",
                "When the last round trained or failed (unix time)",
                times.last_round_end,
            )
        )
    return samples


class MetricsTextfile:
    """Where the agent's metrics go, and the figures only the round runner knows.

    Args:
        path: the ``.prom`` file (None: nothing is written, the figures are still kept).
        client: this agent's id.
        federation: its federation.
    """

    def __init__(self, path: Path | None, client: str, federation: str) -> None:
        self.path = path
        self.labels = {"client": client, "federation": federation}
        self.times = RoundTimes()

    def trained(self, seconds: float) -> None:
        """A round trained in ``seconds``."""
        self.times.training_seconds += seconds
        self.times.last_training_seconds = seconds
        self.times.last_round_end = time.time()

    def failed(self) -> None:
        """A round attempt failed."""
        self.times.last_round_end = time.time()

    def text(self, figures: AgentFigures) -> str:
        """The file's content for ``figures``."""
        samples: Sequence[Sample] = agent_samples(figures)
        info = {**self.labels, "version": fedmq.__version__}
        head = render(samples[:1], info)
        return head + render(samples[1:], self.labels)

    def write(self, figures: AgentFigures) -> None:
        """Replace the file atomically (no fsync: a lost update is rewritten next round).

        Raises:
            OSError: the directory is missing or not writable.
        """
        if self.path is None:
            return
        write_file(self.path, self.text(figures).encode("utf-8"), durable=False)
