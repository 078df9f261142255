"""What ``AggregatorService.statistics()`` returns: a frozen snapshot of its counters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedmq.coordinator.lifecycle import Phase


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
