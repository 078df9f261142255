"""What a monitor knows about a federation: the control messages it saw, folded.

Pure: :meth:`MonitorState.fold` takes one received message (topic, payload, the
monitor's clock, whether the broker delivered it from its retained store) and
:meth:`MonitorState.snapshot` turns what was folded into one JSON-ready dict, the
``fedmq monitor --once --json`` output and what :mod:`fedmq.monitor.view` draws.

Only the control topics are read (``round``, ``status/<client>``,
``aggregator/status``): that is what the read-only monitor identity may subscribe to.
Per agent the snapshot shows the state the agent reports (``declined`` with its
reason when it cannot take part in a round: bad data, disk full, a bundle it cannot
run), except ``offline`` also for an agent silent for more than 3 heartbeats (a hung
device, or a last will the broker has not fired yet).  Of the selected agents the
aggregator still waits for (its status's ``missing``), the offline ones are
*dropouts* and the others *stragglers*; agents that declined the current round are
listed apart (the aggregator does not wait for them).

With the aggregator's public key (``trusted``) the announcement and the aggregator
status are verified before they are used: a message that is unsigned, signed by
another key or altered is counted as a problem and changes nothing.  Without it they are
shown as ``unverified``.  Agent statuses are never signed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from fedmq.errors import RemoteProtocolError
from fedmq.wire.control import (
    AgentState,
    AgentStatus,
    AggregatorStatus,
    RoundAnnouncement,
    decode_control,
)
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits
from fedmq.wire.signing import TrustedKeys
from fedmq.wire.topics import (
    DEFAULT_ROOT,
    AggregatorStatusTopic,
    RoundTopic,
    StatusTopic,
    Topics,
)

Trust = Literal["verified", "unverified"]

SNAPSHOT_VERSION = 1
DEFAULT_HEARTBEAT_S = 10.0  # what the aggregator assumes for statuses that state none
MISSED_HEARTBEATS = 3  # silent heartbeat periods after which an agent shows offline
MAX_AGENTS = 10_000  # agents tracked at most: retained statuses of made-up ids stay bounded
MAX_HISTORY = 10_000  # rounds kept in the trend
MAX_PROBLEMS = 20  # newest undecodable or badly signed messages kept
LOSS_KEYS = ("eval_loss", "train_loss", "loss")  # the first present is the loss trend
ACCURACY_KEYS = ("eval_accuracy", "accuracy", "train_accuracy")


@dataclass
class AgentEntry:
    """An agent's latest status and when it was (probably) published, monitor clock."""

    status: AgentStatus
    seen: float


@dataclass(frozen=True)
class RoundPoint:
    """One ended round, from the aggregator status's ``last_round`` and ``metrics``."""

    round: int
    outcome: str
    reason: str
    duration_s: float
    updates: int
    rejected: int
    bytes_in: int
    bytes_out: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The point as a JSON object (``loss``/``accuracy``: the trend's values)."""
        return {
            "round": self.round,
            "outcome": self.outcome,
            "reason": self.reason,
            "duration_s": self.duration_s,
            "updates": self.updates,
            "rejected": self.rejected,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "loss": first_metric(self.metrics, LOSS_KEYS),
            "accuracy": first_metric(self.metrics, ACCURACY_KEYS),
            "metrics": dict(self.metrics),
        }


def first_metric(metrics: dict[str, float], keys: tuple[str, ...]) -> float | None:
    """The value of the first of ``keys`` present in ``metrics``."""
    for key in keys:
        if key in metrics:
            return metrics[key]
    return None


class MonitorState:
    """The federation as seen from its control topics.

    Args:
        federation: the federation id.
        root: the topic root.
        trusted: the aggregator's public keys; None shows its messages ``unverified``.
        limits: decode limits for the control messages.
    """

    def __init__(
        self,
        federation: str,
        root: str = DEFAULT_ROOT,
        *,
        trusted: TrustedKeys | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> None:
        self.topics = Topics(federation, root)
        self.trusted = trusted
        self.limits = limits
        self.announcement: RoundAnnouncement | None = None
        self.aggregator: AggregatorStatus | None = None
        self.agents: dict[str, AgentEntry] = {}
        self.history: dict[int, RoundPoint] = {}
        self.problems: deque[str] = deque(maxlen=MAX_PROBLEMS)
        self.problem_count = 0
        self.ignored_agents = 0  # statuses beyond MAX_AGENTS
        self.messages = 0
        self.seen_round = False  # a retained (or live) round message, even an empty one
        self.seen_aggregator = False

    @property
    def trust(self) -> Trust:
        """Whether the aggregator's messages shown were verified."""
        return "unverified" if self.trusted is None else "verified"

    def topic_filters(self) -> list[str]:
        """What a monitor subscribes to: the control topics only."""
        topics = self.topics
        return [topics.round(), topics.status_filter(), topics.aggregator_status()]

    @property
    def baseline(self) -> bool:
        """The retained round and aggregator status have both arrived."""
        return self.seen_round and self.seen_aggregator

    # ------------------------------------------------------------------ folding

    def fold(self, topic: str, payload: bytes, now: float, *, retained: bool = False) -> bool:
        """Take one received message into account; True if the snapshot may have changed.

        An empty payload is a deleted retained message (``fedmq clear``). Messages that
        do not decode, or (with ``trusted``) are not validly signed, are kept as
        problems and change nothing else.
        """
        self.messages += 1
        try:
            parsed = self.topics.parse(topic)
        except RemoteProtocolError:
            return False
        try:
            match parsed:
                case RoundTopic():
                    self.seen_round = True
                    self.announcement = (
                        decode_control(payload, RoundAnnouncement, self.limits, self.trusted)
                        if payload
                        else None
                    )
                case AggregatorStatusTopic():
                    self.seen_aggregator = True
                    self.aggregator = (
                        decode_control(payload, AggregatorStatus, self.limits, self.trusted)
                        if payload
                        else None
                    )
                    if self.aggregator is not None:
                        self._remember_round(self.aggregator)
                case StatusTopic(client=client):
                    return self._agent(client, payload, now, retained)
                case _:
                    return False  # never subscribed to
        except RemoteProtocolError as exc:  # DecodeError, SignatureError
            self._problem(f"{topic}: {exc}")
        return True

    def _agent(self, client: str, payload: bytes, now: float, retained: bool) -> bool:
        if not payload:
            return self.agents.pop(client, None) is not None
        status = decode_control(payload, AgentStatus, self.limits)
        if status.client != client:
            self._problem(f"status on {client!r}'s topic names {status.client!r}")
            return True
        if client not in self.agents and len(self.agents) >= MAX_AGENTS:
            self.ignored_agents += 1
            return False
        # A retained status was published at its own ts (the agent's clock), possibly long
        # ago; a live one just now.
        seen = min(now, status.ts) if retained else now
        self.agents[client] = AgentEntry(status, seen)
        return True

    def _problem(self, text: str) -> None:
        self.problem_count += 1
        self.problems.append(text[:300])

    def _remember_round(self, status: AggregatorStatus) -> None:
        last = status.last_round
        if last is None:
            return
        # ``metrics`` are the last *closed* round's: a failed round has none of its own.
        metrics = dict(status.metrics) if last.outcome == "closed" else {}
        self.history[last.round] = RoundPoint(
            round=last.round,
            outcome=last.outcome,
            reason=last.reason,
            duration_s=last.duration_s,
            updates=last.updates,
            rejected=last.rejected,
            bytes_in=last.bytes_in,
            bytes_out=last.bytes_out,
            metrics=metrics,
        )
        while len(self.history) > MAX_HISTORY:
            del self.history[min(self.history)]

    # ------------------------------------------------------------------ reading

    def current_round(self) -> int | None:
        """The round the aggregator is on (its status first, else the announcement)."""
        if self.aggregator is not None and self.aggregator.round is not None:
            return self.aggregator.round
        return self.announcement.round if self.announcement is not None else None

    def selected(self) -> list[str] | None:
        """Agents the open round addressed (None: anyone, or no open round known)."""
        announcement = self.announcement
        if announcement is None or announcement.status != "open":
            return None
        if announcement.round != self.current_round():
            return None
        return list(announcement.selected) if announcement.selected is not None else None

    def missing(self) -> set[str] | None:
        """Selected agents the aggregator still waits for (None: not collecting)."""
        status = self.aggregator
        if status is None or status.state != "collecting":
            return None
        return set(status.missing)

    def agent_state(self, client: str, now: float) -> AgentState:
        """A known agent's state: as reported, or ``offline`` when silent."""
        status = self.agents[client].status
        if self.silent(client, now):
            return "offline"
        return status.state

    def silent(self, client: str, now: float) -> bool:
        """No status from ``client`` for more than :data:`MISSED_HEARTBEATS` heartbeats."""
        entry = self.agents[client]
        heartbeat = entry.status.heartbeat_s or DEFAULT_HEARTBEAT_S
        return entry.status.state != "offline" and now - entry.seen > MISSED_HEARTBEATS * heartbeat

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything known, as one JSON-ready dict (the ``--once --json`` output)."""
        agents = [self._agent_json(client, now) for client in sorted(self.agents)]
        by_state: dict[str, int] = {}
        for agent in agents:
            by_state[agent["state"]] = by_state.get(agent["state"], 0) + 1
        states = {agent["client"]: agent["state"] for agent in agents}
        missing = self.missing()
        waiting = sorted(missing) if missing is not None else []
        dropouts = [c for c in waiting if states.get(c, "offline") == "offline"]
        stragglers = [c for c in waiting if c not in dropouts]
        current = self.current_round()
        declined = [
            agent["client"]
            for agent in agents
            if agent["state"] == "declined" and agent["round"] == current
        ]
        status = self.aggregator
        selected = self.selected()
        return {
            "v": SNAPSHOT_VERSION,
            "federation": self.topics.federation,
            "root": self.topics.root,
            "at": now,
            "complete": self.baseline,
            "round": self._round_json(now),
            "aggregator": self._aggregator_json(now),
            "agents": agents,
            "counts": {
                "agents": len(agents),
                "by_state": dict(sorted(by_state.items())),
                "selected": len(selected) if selected is not None else None,
                "received": status.received if status is not None else None,
                "expected": status.expected if status is not None else None,
                "missing": status.missing_count if missing is not None and status else 0,
                "stragglers": len(stragglers),
                "dropouts": len(dropouts),
                "declined": len(declined),
                "ignored_agents": self.ignored_agents,
            },
            "stragglers": stragglers,
            "dropouts": dropouts,
            "declined": declined,
            "rejections": {
                "by_reason": dict(sorted(status.rejected.items())) if status is not None else {},
                "recent": (
                    [r.model_dump(mode="json") for r in status.recent_rejections]
                    if status is not None
                    else []
                ),
            },
            "history": [self.history[n].to_json() for n in sorted(self.history)],
            "problems": {"count": self.problem_count, "recent": list(self.problems)},
        }

    def _agent_json(self, client: str, now: float) -> dict[str, Any]:
        entry = self.agents[client]
        status = entry.status
        selected = self.selected()
        missing = self.missing()
        return {
            "client": client,
            "state": self.agent_state(client, now),
            "reported_state": status.state,
            "round": status.round,
            "progress": status.progress,
            "last_seen": entry.seen,
            "last_seen_s": max(0.0, now - entry.seen),
            "silent": self.silent(client, now),
            "selected": None if selected is None else client in selected,
            "missing": None if missing is None else client in missing,
            "declined": status.declined,
            "last_error": status.last_error,
            "heartbeat_s": status.heartbeat_s,
            "versions": dict(status.versions),
        }

    def _round_json(self, now: float) -> dict[str, Any] | None:
        announcement = self.announcement
        if announcement is None:
            return None
        selected = announcement.selected
        return {
            "round": announcement.round,
            "status": announcement.status,
            "mode": announcement.mode,
            "issued_at": announcement.issued_at,
            "deadline": announcement.deadline,
            "deadline_in_s": announcement.deadline - now if announcement.status == "open" else None,
            "selected": list(selected) if selected is not None else None,
            "codec": announcement.codec,
            "signature": self.trust,
        }

    def _aggregator_json(self, now: float) -> dict[str, Any] | None:
        status = self.aggregator
        if status is None:
            return None
        return {
            "id": status.aggregator,
            "state": status.state,
            "round": status.round,
            "rounds": status.rounds,
            "deadline": status.deadline,
            "deadline_in_s": status.deadline - now if status.deadline is not None else None,
            "opened_at": status.opened_at,
            "received": status.received,
            "expected": status.expected,
            "missing": list(status.missing),
            "missing_count": status.missing_count,
            "rejected": dict(sorted(status.rejected.items())),
            "bytes_in": status.bytes_in,
            "bytes_out": status.bytes_out,
            "metrics": dict(status.metrics),
            "last_round": status.last_round.model_dump(mode="json") if status.last_round else None,
            "task": status.task,
            "evaluation": status.evaluation.model_dump(mode="json") if status.evaluation else None,
            "ts": status.ts,
            "age_s": max(0.0, now - status.ts),
            "signature": self.trust,
        }
