"""Which agents exist and which are online, from their retained status messages.

An agent is online while its last status is not ``offline`` and it has refreshed that
status within ``missed_heartbeats`` heartbeat periods.  Times are receipt times (the
coordinator's clock), so clock skew on devices does not matter; after an aggregator
restart the retained statuses count as fresh for one timeout, then expire unless the
agent really is heartbeating.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedmq.wire.control import AgentState, AgentStatus
from fedmq.wire.signing import VerifyKey

DEFAULT_HEARTBEAT = 10.0  # seconds: the agents' default status refresh period
MISSED_HEARTBEATS = 3  # periods without a status before an agent counts as gone
# seconds an agent that said "offline" may take to come back before a round stops waiting
# for it: a broker restart fires every agent's last will, and they reconnect within seconds.
DROPOUT_GRACE = 5.0


def allowed_agents(
    agents: frozenset[str] | None, devices: Mapping[str, VerifyKey] | None
) -> frozenset[str] | None:
    """The agents the roster knows: the allow list, narrowed to the registered devices."""
    if devices is None:
        return agents
    registered = frozenset(devices)
    return registered if agents is None else registered & agents


@dataclass
class Presence:
    """What the roster knows about one agent."""

    client: str
    state: AgentState
    last_seen: float
    heartbeat_s: float
    round: int | None = None
    offline_since: float | None = None


class Roster:
    """Agent presence, updated from status messages and the passage of time.

    Args:
        default_heartbeat_s: heartbeat assumed when a status does not state one.
        missed_heartbeats: periods of silence after which an agent is gone.
        allowed: if given, only these agents are known; statuses from others are ignored.
        dropout_grace_s: how long an agent that said ``offline`` stays "maybe back soon"
            for :meth:`is_gone` (it is not online, so never selected, meanwhile).
        max_agents: agents tracked at most; statuses of further ids are ignored and
            counted in :attr:`ignored` (a flood of made-up ids cannot grow the roster).
    """

    def __init__(
        self,
        default_heartbeat_s: float = DEFAULT_HEARTBEAT,
        missed_heartbeats: int = MISSED_HEARTBEATS,
        allowed: Iterable[str] | None = None,
        dropout_grace_s: float = DROPOUT_GRACE,
        max_agents: int | None = None,
    ) -> None:
        self.default_heartbeat_s = default_heartbeat_s
        self.missed_heartbeats = missed_heartbeats
        self.dropout_grace_s = dropout_grace_s
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.max_agents = max_agents
        self.ignored = 0  # statuses of unknown or excess ids
        self._agents: dict[str, Presence] = {}

    def set_allowed(self, allowed: Iterable[str] | None) -> None:
        """Replace the allow list; agents no longer on it are forgotten."""
        self.allowed = frozenset(allowed) if allowed is not None else None
        if self.allowed is not None:
            for client in [c for c in self._agents if c not in self.allowed]:
                del self._agents[client]

    def is_known(self, client: str) -> bool:
        """True for an allowed agent (if there is an allow list) that has ever sent a status."""
        if self.allowed is not None and client not in self.allowed:
            return False
        return client in self._agents

    def update(self, status: AgentStatus, now: float) -> bool:
        """Record a status received at ``now``; False if it is ignored (and counted).

        Ignored: the agent is not allowed, or it is new and the roster is full.
        """
        if (self.allowed is not None and status.client not in self.allowed) or (
            self.max_agents is not None
            and status.client not in self._agents
            and len(self._agents) >= self.max_agents
        ):
            self.ignored += 1
            return False
        heartbeat = status.heartbeat_s or self.default_heartbeat_s
        previous = self._agents.get(status.client)
        offline_since = None
        if status.state == "offline":
            # Repeated offline statuses (a retained will delivered again) keep the first time.
            already = previous is not None and previous.offline_since is not None
            offline_since = previous.offline_since if already else now  # type: ignore[union-attr]
        self._agents[status.client] = Presence(
            status.client, status.state, now, heartbeat, status.round, offline_since
        )
        return True

    def ignored_note(self, client: str) -> str | None:
        """The log line for ``client``'s status just ignored (None: one of a flood, quiet)."""
        ignored = self.ignored
        if ignored & (ignored - 1):  # log the 1st, 2nd, 4th, 8th...: a flood stays quiet
            return None
        allowed = self.allowed
        why = (
            "not on the agents list or device registry"
            if allowed is not None and client not in allowed
            else f"roster full at max_agents = {self.max_agents}"
        )
        return f"ignoring status of {client!r} ({why}; {ignored} ignored so far)"

    def forget(self, client: str) -> None:
        """Drop an agent whose retained status was deleted."""
        self._agents.pop(client, None)

    def expires_at(self, client: str) -> float | None:
        """When ``client`` stops counting as online (None: not online at all)."""
        presence = self._agents.get(client)
        if presence is None or presence.state == "offline":
            return None
        return presence.last_seen + self.missed_heartbeats * presence.heartbeat_s

    def is_online(self, client: str, now: float) -> bool:
        """True if ``client`` is online at ``now``."""
        expiry = self.expires_at(client)
        return expiry is not None and now < expiry and self.is_known(client)

    def gone_at(self, client: str) -> float | None:
        """When a round stops waiting for ``client`` (None: unknown, gone already)."""
        presence = self._agents.get(client)
        if presence is None or not self.is_known(client):
            return None
        if presence.offline_since is not None:
            return presence.offline_since + self.dropout_grace_s
        return self.expires_at(client)

    def is_gone(self, client: str, now: float) -> bool:
        """True once a round should no longer wait for ``client``."""
        when = self.gone_at(client)
        return when is None or now >= when

    def next_gone(self, now: float, among: Iterable[str]) -> float | None:
        """Earliest future time one of ``among`` becomes gone."""
        times = [t for c in among if (t := self.gone_at(c)) is not None and t > now]
        return min(times, default=None)

    def online(self, now: float) -> list[str]:
        """Agents online at ``now``, sorted."""
        return sorted(client for client in self._agents if self.is_online(client, now))

    def next_expiry(self, now: float, among: Iterable[str] | None = None) -> float | None:
        """Earliest future time an online agent (of ``among``, default all) expires."""
        clients = self._agents if among is None else among
        times = [
            expiry
            for client in clients
            if (expiry := self.expires_at(client)) is not None and expiry > now
        ]
        return min(times, default=None)

    def get(self, client: str) -> Presence | None:
        """The presence record of ``client``."""
        return self._agents.get(client)

    def __len__(self) -> int:
        return len(self._agents)
