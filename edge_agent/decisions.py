"""The agent's protocol decisions, pure: what to do with an announcement, an ack, an outbox entry.

No IO and no clock of its own (``now`` is an argument), so every rule is a table-driven
unit test.  The round runner (:mod:`edge_agent.rounds`) and the uploader
(:mod:`edge_agent.uploader`) feed these functions what arrives and carry out what they
return.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Literal

from edge_agent.outbox import OutboxEntry
from fedmq.errors import BundleError, DataError, TrainingError
from fedmq.wire.control import Ack, DeclineReason, RoundAnnouncement

MAX_BACKOFF_DOUBLINGS = 4  # re-sends of one update back off to 16x the ack timeout at most
# A re-send wait never exceeds this share of the time left to the round's deadline (but
# is at least MIN_RESEND_WAIT): an unanswered upload is retried several times in time.
DEADLINE_SHARE = 0.25
MIN_RESEND_WAIT = 2.0  # seconds

# Rejections meaning "this round no longer takes updates": re-sending cannot help.
ROUND_OVER_REASONS = frozenset({"round_closed", "stale_round"})


@dataclass(frozen=True)
class Train:
    """Train on this announcement (cancelling work on any other round)."""

    announcement: RoundAnnouncement


@dataclass(frozen=True)
class Skip:
    """Ignore the announcement; ``level`` is how loudly to log ``reason``."""

    reason: str
    level: int = logging.INFO


@dataclass(frozen=True)
class Finished:
    """The federation is over: stop work, drop the outbox, go idle."""

    reason: str


RoundDecision = Train | Skip | Finished


def decide_round(
    announcement: RoundAnnouncement,
    *,
    client: str,
    federation: str,
    last_answered: int | None,
    working_on: int | None,
) -> RoundDecision:
    """Decide what an agent does with a round announcement.

    Args:
        announcement: the decoded announcement.
        client: this agent's id.
        federation: the federation this agent belongs to.
        last_answered: the newest round this agent has committed an update for.
        working_on: the round currently downloading/training, if any.
    """
    if announcement.federation != federation:
        return Skip(
            f"announcement for federation {announcement.federation!r} on the topic of "
            f"{federation!r}",
            logging.WARNING,
        )
    if announcement.status == "finished":
        return Finished(f"federation {federation!r} finished at round {announcement.round}")
    round_id = announcement.round
    if announcement.status == "waiting":
        return Skip(f"round {round_id} is waiting for agents to come online", logging.DEBUG)
    if last_answered is not None and round_id <= last_answered:
        if round_id == last_answered:
            return Skip(f"round {round_id} already answered", logging.DEBUG)
        return Skip(f"stale round {round_id}: round {last_answered} was already answered")
    if working_on is not None and round_id <= working_on:
        if round_id == working_on:
            return Skip(f"round {round_id} already in progress", logging.DEBUG)
        return Skip(f"stale round {round_id}: already working on round {working_on}")
    if not announcement.addresses(client):
        return Skip(f"round {round_id} does not select {client!r}", logging.DEBUG)
    return Train(announcement)


class OutOfTimeError(TrainingError):
    """Training ran past ``limits.max_train_seconds``."""


def decline_reason(error: BaseException) -> DeclineReason | None:
    """Why a failed round means this device cannot take part (None: retry quietly).

    Problems of the device (its data, disk, memory, time budget) or of the model on it
    are declined at once, so the round does not wait for an update that will not come;
    download problems (a lost or corrupt chunk, the broker gone) are retried.
    """
    if isinstance(error, DataError):
        return "data_error"
    if isinstance(error, OutOfTimeError):
        return "out_of_time"
    if isinstance(error, MemoryError):
        return "out_of_memory"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    if isinstance(error, BundleError):
        return "bundle_incompatible"
    if isinstance(error, TrainingError):
        return "training_failed"
    return None


@dataclass(frozen=True)
class IgnoreAck:
    """The ack is not for us or refers to nothing we hold."""

    reason: str
    level: int = logging.DEBUG


@dataclass(frozen=True)
class RemoveEntry:
    """Delete the outbox entry; log ``message`` at ``level``.

    ``error`` is set for rejections worth showing in the status's ``last_error``.
    """

    update_id: str
    message: str
    level: int = logging.INFO
    error: str | None = None


AckDecision = IgnoreAck | RemoveEntry


def decide_ack(ack: Ack, *, client: str, federation: str, entry: OutboxEntry | None) -> AckDecision:
    """Decide what an ack means for the outbox.

    Any ack naming an update id we hold removes it: accepted and duplicate mean it
    counted; a closed round means it never will; any other rejection would be rejected
    again if re-sent.
    """
    if ack.client != client or ack.federation != federation:
        return IgnoreAck(
            f"ack for {ack.federation}/{ack.client}, not {federation}/{client}", logging.WARNING
        )
    if entry is None:
        return IgnoreAck(f"ack for unknown update {ack.update_id} (already acknowledged?)")
    where = f"update {ack.update_id} for round {entry.round}"
    if ack.accepted:
        what = "counted already (duplicate)" if ack.reason == "duplicate" else "accepted"
        return RemoveEntry(ack.update_id, f"{where} {what}")
    detail = f": {ack.detail}" if ack.detail else ""
    if ack.reason in ROUND_OVER_REASONS:
        return RemoveEntry(
            ack.update_id, f"{where} dropped: the round is over ({ack.reason}{detail})"
        )
    return RemoveEntry(
        ack.update_id,
        f"{where} rejected ({ack.reason}{detail}); dropped",
        logging.WARNING,
        error=f"update for round {entry.round} rejected: {ack.reason}{detail}",
    )


@dataclass
class SendRecord:
    """When an outbox entry was last sent in full, on which connection.

    ``jitter`` (in [0.5, 1], drawn at each send) scales the next wait, so devices that
    lost their uploads together do not re-send together.
    """

    sent_at: float | None = None
    connection: int | None = None
    sends: int = 0
    jitter: float = 1.0


SendAction = Literal["send", "wait", "expire"]


def outbox_action(
    entry: OutboxEntry,
    record: SendRecord,
    *,
    now: float,
    connection: int,
    ack_timeout: float,
    max_age: float,
) -> tuple[SendAction, float | None]:
    """Decide whether to (re)send an unacknowledged update now.

    An update is sent once per broker connection (a reconnect may have lost chunks the
    broker had acknowledged but not delivered), and again when no ack came within the
    ack timeout, doubling the wait each time, but never waiting more than a quarter of
    the time its round had left (at least ``MIN_RESEND_WAIT``), jittered by the
    record's ``jitter``.  Past ``max_age`` it is expired: the aggregator's round is long
    over.

    Returns:
        The action and, for ``wait``, the time at which to ask again.
    """
    if now - entry.created_at > max_age:
        return "expire", None
    if record.sent_at is None or record.connection != connection:
        return "send", None
    wait = ack_timeout * 2 ** min(max(record.sends - 1, 0), MAX_BACKOFF_DOUBLINGS)
    if entry.deadline is not None:
        left = entry.deadline - record.sent_at
        wait = min(wait, max(MIN_RESEND_WAIT, DEADLINE_SHARE * left))
    due = record.sent_at + wait * record.jitter
    if now >= due:
        return "send", None
    return "wait", due
