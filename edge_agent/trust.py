"""What the agent believes: verified, fresh control messages from its aggregator.

With a ``[security]`` table every announcement and ack must carry a valid signature by
one of the pinned aggregator keys, and an announcement must not be older
(``issued_at``) than the newest valid one seen, which is kept in the state directory
so a replayed retained announcement is refused after a restart too.  Anything refused
changes nothing: the caller logs the reason and drops the message.

Without it (development brokers) messages are only decoded, and the agent warns once
at start that it obeys anyone on the broker.
"""

from __future__ import annotations

import logging

from edge_agent.state import StateDir
from fedmq.buffers import Buffer
from fedmq.wire.control import (
    Ack,
    AggregatorStatus,
    ResendRequest,
    RoundAnnouncement,
    control_type,
    decode_control,
)
from fedmq.wire.signing import ReplayedMessageError, TrustedKeys

log = logging.getLogger(__name__)


class ControlTrust:
    """Decodes control messages for one agent and decides whether to believe them.

    Args:
        trusted: the pinned aggregator keys (None: unsigned development mode).
        state_dir: where the newest announcement's time is kept.
    """

    def __init__(self, trusted: TrustedKeys | None, state_dir: StateDir) -> None:
        self.trusted = trusted
        self._state_dir = state_dir
        self.refused = 0

    @property
    def signed(self) -> bool:
        """Whether signatures are required."""
        return self.trusted is not None

    def announcement(self, payload: Buffer) -> RoundAnnouncement:
        """A verified, fresh announcement.

        Raises:
            DecodeError: malformed.
            SignatureError: unsigned, forged, signed by another key, or a replay
                (:class:`~fedmq.wire.signing.ReplayedMessageError`).
        """
        announcement = decode_control(payload, RoundAnnouncement, trusted=self.trusted)
        if self.trusted is None:
            return announcement
        newest = self._state_dir.state.newest_announcement
        if newest is not None and announcement.issued_at < newest:
            raise ReplayedMessageError(
                f"round {announcement.round} announcement issued at "
                f"{announcement.issued_at:.3f} is older than the newest seen ({newest:.3f})"
            )
        try:
            self._state_dir.note_announcement(announcement.issued_at)
        except OSError as exc:  # the replay mark is lost on restart only: keep going
            log.error("cannot record the announcement time in the state directory: %s", exc)
        return announcement

    def aggregator_status(self, payload: Buffer) -> AggregatorStatus:
        """A verified aggregator status (it makes the agent re-send, so it is checked too).

        Raises:
            DecodeError: malformed.
            SignatureError: unsigned, forged or signed by another key.
        """
        return decode_control(payload, AggregatorStatus, trusted=self.trusted)

    def ack(self, payload: Buffer) -> Ack | ResendRequest:
        """A verified message of our ack topic: an ack, or a request for missing chunks.

        Whether it names an update we sent is the uploader's check.

        Raises:
            DecodeError: malformed.
            SignatureError: unsigned, forged or signed by another key.
        """
        if control_type(payload) == ResendRequest.TYPE:
            return decode_control(payload, ResendRequest, trusted=self.trusted)
        return decode_control(payload, Ack, trusted=self.trusted)
