"""Deleting what a federation left retained on the broker (``fedmq clear``, ``fedmq simulate``).

A finished aggregator clears its own blobs and keeps only the small ``finished``
announcement; federations stopped before that (or from older fedmq versions) leave the
announcement, blob chunks and every status retained.  :func:`clear_federation` removes
all of it:

1. **Scan**: subscribe to ``<root>/<federation>/#`` on a clean session and collect the
   retained messages until a marker published on ``<root>/<federation>/clear/<client id>``
   comes back (:func:`~fedmq.transport.retained.retained_snapshot`): MQTT has no "end of
   retained messages", the marker is the proof that nothing more is coming.
2. **Refuse** while the retained aggregator status says anything but ``offline``: a
   running aggregator would publish everything again (``force`` clears anyway).
3. **Clear**: publish an empty retained message on every topic of the fedmq scheme
   found: the announcement, every blob chunk, the aggregator status, every agent status.
   Retained topics under the prefix that are not fedmq's are listed and left alone.
4. **Verify**: scan again.  What a broker dropped beyond its queue limits in the first
   scan shows up now and is cleared too, until a scan finds nothing.  What comes back
   after being cleared means someone republished it (a running aggregator, a broker ACL
   refusing our empty messages): reported.  Agents still running publish their status
   again at every heartbeat: reported apart.

The identity needs read and write access to ``<root>/<federation>/#`` (broker ACL).
It lives in the transport layer, beside :mod:`~fedmq.transport.retained`, so that
both the ``fedmq clear`` command and ``fedmq simulate`` (which clears what it
retained on an external broker) use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedmq.errors import DecodeError, InvalidTopicError
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.mqtt import MqttSession
from fedmq.transport.retained import SCAN_TIMEOUT, retained_snapshot
from fedmq.wire.control import AgentStatus, AggregatorStatus, RoundAnnouncement, decode_control
from fedmq.wire.topics import (
    AckTopic,
    AggregatorStatusTopic,
    BlobChunkTopic,
    RoundTopic,
    StatusTopic,
    Topics,
    UpdateChunkTopic,
)

MARKER_LEVEL = "clear"  # <root>/<federation>/clear/<client id>: outside the topic scheme
MAX_PASSES = 5  # verification scans before giving up on a broker that keeps dropping
CLEAR_TIMEOUT = 30.0  # seconds for the broker to acknowledge each empty retained message
LISTED = 8  # names shown per line before "…"


class ClearRefusedError(Exception):
    """The aggregator is still running: clearing now would be undone."""


@dataclass
class Retained:
    """One federation's retained messages, sorted by what they are."""

    announcement: tuple[str, bytes] | None = None
    blobs: dict[str, list[str]] = field(default_factory=dict)  # sha256 -> chunk topics
    aggregator: tuple[str, bytes] | None = None
    agents: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # client -> message
    stray: list[str] = field(default_factory=list)  # retained update/ack topics (never ours)
    foreign: list[str] = field(default_factory=list)  # under the prefix, not fedmq topics

    @classmethod
    def sort(cls, topics: Topics, messages: Mapping[str, bytes]) -> Retained:
        """Sort retained ``messages`` (topic -> payload) by the topic scheme."""
        found = cls()
        for topic, payload in sorted(messages.items()):
            try:
                parsed = topics.parse(topic)
            except InvalidTopicError:
                found.foreign.append(topic)
                continue
            match parsed:
                case RoundTopic():
                    found.announcement = (topic, payload)
                case BlobChunkTopic():
                    found.blobs.setdefault(parsed.sha256, []).append(topic)
                case AggregatorStatusTopic():
                    found.aggregator = (topic, payload)
                case StatusTopic():
                    found.agents[parsed.client] = (topic, payload)
                case UpdateChunkTopic() | AckTopic():
                    found.stray.append(topic)
        return found

    def clearable(self) -> list[str]:
        """Every fedmq topic to clear."""
        topics = [topic for topic, _ in filter(None, (self.announcement, self.aggregator))]
        topics += [topic for chunks in self.blobs.values() for topic in chunks]
        topics += [topic for topic, _ in self.agents.values()]
        return sorted([*topics, *self.stray])

    def running_aggregator(self) -> str | None:
        """Why the aggregator looks alive (its retained status), or None."""
        if self.aggregator is None:
            return None
        try:
            status = decode_control(self.aggregator[1], AggregatorStatus)
        except DecodeError as exc:
            return f"its retained status does not decode ({exc})"
        if status.state == "offline":
            return None
        return f"its status says {status.state!r} (round {status.round})"

    def live_agents(self) -> list[str]:
        """Agents whose retained status is not ``offline`` (they will publish it again)."""
        live = []
        for client, (_, payload) in self.agents.items():
            try:
                if decode_control(payload, AgentStatus).state != "offline":
                    live.append(client)
            except DecodeError:
                continue
        return sorted(live)

    def describe(self, verb: str) -> list[str]:
        """One line per kind of thing found, starting with ``verb``."""
        lines = []
        if self.announcement is not None:
            lines.append(f"{verb} {self.announcement[0]} ({_announcement(self.announcement[1])})")
        for sha256, chunks in sorted(self.blobs.items()):
            lines.append(f"{verb} blob {sha256[:16]}… ({len(chunks)} chunks)")
        if self.aggregator is not None:
            lines.append(f"{verb} {self.aggregator[0]} ({_aggregator(self.aggregator[1])})")
        if self.agents:
            names = shown_names(sorted(self.agents))
            lines.append(f"{verb} {len(self.agents)} agent statuses: {names}")
        if self.stray:
            lines.append(f"{verb} {len(self.stray)} retained update/ack messages")
        return lines


def _announcement(payload: bytes) -> str:
    try:
        announcement = decode_control(payload, RoundAnnouncement)
    except DecodeError:
        return "undecodable"
    return f"{announcement.status}, round {announcement.round}"


def _aggregator(payload: bytes) -> str:
    try:
        return decode_control(payload, AggregatorStatus).state
    except DecodeError:
        return "undecodable"


def shown_names(names: list[str]) -> str:
    """Up to ``LISTED`` names, comma-separated, "…" when there are more."""
    shown = ", ".join(names[:LISTED])
    return shown + (", …" if len(names) > LISTED else "")


@dataclass
class ClearReport:
    """What :func:`clear_federation` found and did."""

    found: Retained
    cleared: set[str] = field(default_factory=set)
    came_back: list[str] = field(default_factory=list)  # cleared, then retained again
    live_agents: list[str] = field(default_factory=list)
    passes: int = 0


async def _publish_empty(session: MqttSession, topics: list[str]) -> None:
    async with asyncio.TaskGroup() as group:
        for topic in topics:
            group.create_task(
                session.publish(topic, b"", qos=1, retain=True, timeout=CLEAR_TIMEOUT)
            )


async def clear_federation(
    settings: BrokerSettings,
    topics: Topics,
    *,
    force: bool = False,
    dry_run: bool = False,
    timeout: float = SCAN_TIMEOUT,
) -> ClearReport:
    """Scan, refuse or clear, and verify (see the module docstring).

    Raises:
        ClearRefusedError: the aggregator looks alive and ``force`` is False.
        TransportError: the broker is unreachable or did not acknowledge.
        ConfigError: the TLS files cannot be loaded.
    """
    marker = f"{topics.prefix}/{MARKER_LEVEL}/{settings.client_id}"
    topic_filter = f"{topics.prefix}/#"
    async with retained_snapshot(settings, topic_filter, marker, timeout=timeout) as scan:
        found = Retained.sort(topics, scan.messages)
        report = ClearReport(found, passes=1)
        why = found.running_aggregator()
        if why is not None and not force:
            raise ClearRefusedError(f"the aggregator of {topics.prefix} is running: {why}")
        if dry_run:
            return report
        todo = found.clearable()
        await _publish_empty(scan.session, todo)
        report.cleared.update(todo)
    while report.passes < MAX_PASSES:
        async with retained_snapshot(settings, topic_filter, marker, timeout=timeout) as scan:
            report.passes += 1
            again = Retained.sort(topics, scan.messages)
            live = again.live_agents()
            republishing = {again.agents[client][0] for client in live}
            remaining = [t for t in again.clearable() if t not in republishing]
            report.live_agents = live
            report.came_back = [t for t in remaining if t in report.cleared]
            new = [t for t in remaining if t not in report.cleared]
            if not new:
                return report
            # Not delivered by the first scan (the broker's queue limits): clear them too.
            await _publish_empty(scan.session, new)
            report.cleared.update(new)
            found.foreign = sorted({*found.foreign, *again.foreign})
    return report
