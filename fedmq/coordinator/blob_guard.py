"""Keeps the retained blob chunks the announcement names intact on the broker.

Agents that join (or restart) download the bundle and parameters from retained chunks.
Whoever can write a blob topic could replace or delete one chunk and lock every new
agent out, so the aggregator watches the blob topics and republishes any chunk of a
referenced blob that is missing, undecodable, not its own, or holds other bytes.  Under
the production ACL nobody else can write blob topics at all; this is the repair for
brokers that cannot enforce that, and for chunks a broker lost.

Repairs of one chunk are spaced by ``REPAIR_INTERVAL`` so a client rewriting a chunk in
a loop cannot make the aggregator publish in a loop with it.  :meth:`BlobGuard.repair`
is what the coordinator returns for a chunk seen: the republish and a warning saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.buffers import Buffer
from fedmq.coordinator.actions import Action, Noted, PublishBlob
from fedmq.coordinator.ledger import BlobLedger
from fedmq.errors import DecodeError, IntegrityError
from fedmq.wire.chunks import decode_chunk
from fedmq.wire.topics import BlobChunkTopic

REPAIR_INTERVAL = 1.0  # seconds between repairs of one chunk


@dataclass(frozen=True)
class Repair:
    """A chunk to publish again, and why."""

    action: PublishBlob
    reason: str


class BlobGuard:
    """Judges blob chunks seen on the broker against the ledger.

    Args:
        aggregator_id: our client id, the sender every genuine chunk names.
    """

    def __init__(self, aggregator_id: str) -> None:
        self.aggregator_id = aggregator_id
        self.repairs = 0
        self._last: dict[tuple[str, int], float] = {}

    def repair(
        self, topic: BlobChunkTopic, payload: Buffer, ledger: BlobLedger, round_id: int, now: float
    ) -> list[Action]:
        """The actions for a chunk seen on ``topic``: none, or a warning and the republish."""
        repair = self.check(topic, payload, ledger, round_id, now)
        if repair is None:
            return []
        return [
            Noted(
                "warning",
                f"blob chunk {topic.sha256[:12]}…/{topic.index} {repair.reason}: republishing it",
            ),
            repair.action,
        ]

    def check(
        self, topic: BlobChunkTopic, payload: Buffer, ledger: BlobLedger, round_id: int, now: float
    ) -> Repair | None:
        """The repair a chunk on ``topic`` needs (None: it is fine or not ours to keep)."""
        ref = next((r for r in ledger.referenced() if r.sha256 == topic.sha256), None)
        if ref is None or topic.index >= ref.count:
            return None  # a blob we no longer reference (or never did): not our business
        reason = self._problem(topic, payload, ledger, ref.sha256)
        if reason is None:
            return None
        key = (ref.sha256, topic.index)
        last = self._last.get(key)
        if last is not None and now - last < REPAIR_INTERVAL:
            return None
        self._last = {k: t for k, t in self._last.items() if now - t < REPAIR_INTERVAL}
        self._last[key] = now
        self.repairs += 1
        action = PublishBlob(ref, ledger.data(ref), round_id, frozenset({topic.index}))
        return Repair(action, reason)

    def _problem(
        self, topic: BlobChunkTopic, payload: Buffer, ledger: BlobLedger, sha256: str
    ) -> str | None:
        view = memoryview(payload).cast("B")
        if not len(view):
            return "deleted"
        try:
            chunk = decode_chunk(view)
        except (DecodeError, IntegrityError) as exc:
            return f"undecodable ({exc})"
        header = chunk.header
        if header.sender != self.aggregator_id:
            return f"published by {header.sender!r}"
        ref = next(r for r in ledger.referenced() if r.sha256 == sha256)
        if header.kind != "blob" or header.blob != ref or header.index != topic.index:
            return "a chunk of another blob or position"
        if chunk.payload != memoryview(ledger.data(ref))[ref.chunk_span(topic.index)]:
            return "altered bytes"
        return None
