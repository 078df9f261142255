"""What ``AggregatorService.statistics()`` returns: a frozen snapshot of its counters.

:meth:`AggregatorStatistics.collect` gathers it from the coordinator and the reporter's
counters, so the service only says where they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.lifecycle import Phase

REJECTED = "rejected."  # the prefix of the reporter's rejection counters


@dataclass(frozen=True)
class AggregatorStatistics:
    """A snapshot of what the service has done since it started (tests, logs, benchmarks).

    Args:
        phase: the round lifecycle phase (None before the state directory is loaded).
        round: the current round (the open one, or the next to open).
        connections: successful broker connections so far.
        updates_accepted: updates stored, folded and acked.
        rejected: rejections of updates or chunks, by reason.
        rounds_closed: rounds closed with a new model.
        rounds_failed: rounds that ended without one.
        finished: the federation has run its last round.
        bytes_in: update chunk bytes received since the service started.
        bytes_out: blob and control bytes it asked to publish since then (not the
            retained status itself).
        upload_grants: upload slots granted (paced uploads, ``[broker] max_queued_messages``).
        resend_requests: requests for chunks that went missing (a broker dropped them).
    """

    phase: Phase | None
    round: int | None
    connections: int
    updates_accepted: int
    rejected: Mapping[str, int]
    rounds_closed: int
    rounds_failed: int
    finished: bool
    bytes_in: int = 0
    bytes_out: int = 0
    upload_grants: int = 0
    resend_requests: int = 0

    @classmethod
    def collect(
        cls,
        coordinator: Coordinator | None,
        counters: Mapping[str, int],
        connections: int,
        *,
        finished: bool,
    ) -> AggregatorStatistics:
        """The statistics now (``coordinator`` None: the state is not loaded yet)."""
        return cls(
            phase=coordinator.phase if coordinator is not None else None,
            round=coordinator.round if coordinator is not None else None,
            connections=connections,
            updates_accepted=counters["accepted"],
            rejected=MappingProxyType(
                {k[len(REJECTED) :]: v for k, v in counters.items() if k.startswith(REJECTED)}
            ),
            rounds_closed=counters["rounds.closed"],
            rounds_failed=counters["rounds.failed"],
            finished=finished,
            bytes_in=coordinator.report.total.bytes_in if coordinator is not None else 0,
            bytes_out=coordinator.report.total.bytes_out if coordinator is not None else 0,
            upload_grants=coordinator.intake.grants if coordinator is not None else 0,
            resend_requests=coordinator.intake.resends if coordinator is not None else 0,
        )
