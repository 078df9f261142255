"""Reassembling updates from their chunks, with early verdicts before any allocation.

Chunks of one update share ``(client, update id)``.  On the first chunk of an update
the coordinator's ``admit`` gate decides whether it can possibly count (known agent,
round, not a duplicate, size); only then is a buffer of the declared size allocated.
An update refused early is not buffered: its chunks are only ticked off, and the
verdict is answered once the whole (re-)send has been seen, so an agent re-sending
500 chunks gets one ack, not 500.

Bounded: at most ``max_pending`` updates in reassembly (``max_pending_per_client`` per
agent), and partial updates idle for ``ttl_s`` are dropped (the agent re-sends, since
it was never acked).  Only updates that passed admission hold a reassembly slot:
refused ones are ticked off in a separate bounded table (the oldest is forgotten first,
and its sender simply gets no ack), so made-up ids can never crowd out real agents.

With a device registry (``devices``), a chunk counts only when the client id of its
topic (which the broker authenticates) is registered and the chunk carries that
device's valid signature of the update (:func:`~fedmq.wire.signing.update_statement`);
anything else is dropped before it takes any memory.

With ``upload_slots`` set (paced uploads, :mod:`~fedmq.coordinator.pacing`), agents send
only the first chunk of an update and wait: at most ``upload_slots`` admitted updates
are *granted* at a time (in the order their first chunks arrived), and a grant is due
at once as a resend request for the rest.  When a granted update completes or expires,
the oldest waiting one is granted.  Refused updates are answered on their first chunk,
since a paced agent sends no other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from fedmq.buffers import Buffer
from fedmq.coordinator.validation import UpdateKey
from fedmq.errors import DecodeError, IntegrityError, LimitExceededError
from fedmq.wire.blobs import BlobAssembler, BlobRef
from fedmq.wire.chunks import ChunkHeader, decode_chunk
from fedmq.wire.control import MAX_RESEND_INDICES, AckReason
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits
from fedmq.wire.signing import VerifyKey, update_statement
from fedmq.wire.topics import UpdateChunkTopic

DEFAULT_MAX_PENDING = 64  # updates in reassembly at once: a burst of 50 agents fits
DEFAULT_MAX_PENDING_PER_CLIENT = 2  # an agent re-sending under a new id replaces, not adds
DEFAULT_TTL = 120.0  # seconds without a chunk before a partial update is dropped
REFUSED_PER_SLOT = 4  # refused updates ticked off per reassembly slot before forgetting
# seconds without a chunk before an admitted, incomplete update's missing chunks are asked
# for: an upload streams its chunks back to back, so a pause this long means some were
# dropped on the way (a broker past its queue limit drops them silently).
DEFAULT_RESEND_AFTER = 1.0
MAX_RESEND_DOUBLINGS = 4  # later requests for one update wait up to 16x as long


@dataclass(frozen=True)
class Verdict:
    """An early answer to an update: the ack to send once all its chunks were seen."""

    accepted: bool
    reason: AckReason
    detail: str = ""


Gate = Callable[[ChunkHeader], Verdict | None]


@dataclass(frozen=True)
class ChunkProblem:
    """A chunk that cannot be attributed to an update (no ack possible): log and count."""

    client: str
    round: int
    reason: str
    detail: str


@dataclass(frozen=True)
class Answered:
    """Every chunk of an early-judged update was seen: send ``verdict`` as its ack."""

    key: UpdateKey
    verdict: Verdict


@dataclass(frozen=True)
class Assembled:
    """Every chunk of an update arrived.

    Its sha256 is checked with the rest of the update, off the event loop
    (:func:`~fedmq.coordinator.validation.verify_assembled`).
    """

    key: UpdateKey
    assembler: BlobAssembler = field(repr=False)


IntakeEvent = ChunkProblem | Answered | Assembled


@dataclass
class _Pending:
    key: UpdateKey
    ref: BlobRef
    last_seen: float
    assembler: BlobAssembler | None = None
    verdict: Verdict | None = None
    seen: bytearray = field(default_factory=bytearray)
    unseen: int = 0
    signature: bytes | None = None
    resend_at: float | None = None  # when to ask for the missing chunks (granted only)
    resends: int = 0
    granted: bool = True  # may send all its chunks (False: waits for an upload slot)
    grant_due: bool = False  # granted, and the grant (a resend request) not yet sent
    answered: bool = False  # refused, and its verdict was given already


@dataclass(frozen=True)
class ResendDue:
    """Ask ``key``'s sender for the chunks of ``ref`` at ``missing``."""

    key: UpdateKey
    ref: BlobRef
    missing: list[int]


class UpdateIntake:
    """Turns update chunk messages into complete updates or early answers.

    Args:
        federation: our federation id (chunks for another are answered as such).
        limits: decode limits for single chunk messages.
        max_update_bytes: largest update accepted; larger ones are refused unbuffered.
        max_pending: updates in reassembly at once.
        max_pending_per_client: updates of one agent in reassembly at once.
        ttl_s: idle seconds before a partial update is dropped.
        devices: the device registry (None: updates are not signature-checked).
        resend_after_s: idle seconds before the missing chunks of an update are asked for.
        upload_slots: admitted updates granted at once (None: every one, no pacing);
            follows the announcement (:meth:`set_upload_slots`).
    """

    def __init__(
        self,
        federation: str,
        *,
        max_update_bytes: int,
        limits: DecodeLimits = DEFAULT_LIMITS,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_per_client: int = DEFAULT_MAX_PENDING_PER_CLIENT,
        ttl_s: float = DEFAULT_TTL,
        devices: Mapping[str, VerifyKey] | None = None,
        resend_after_s: float = DEFAULT_RESEND_AFTER,
        upload_slots: int | None = None,
    ) -> None:
        self.federation = federation
        self.upload_slots = upload_slots
        self.grants_ready = False  # a grant became due: call resend_due() now
        self.resend_after_s = resend_after_s
        self.devices = devices
        self.limits = limits
        self.max_update_bytes = max_update_bytes
        self.max_pending = max_pending
        self.max_pending_per_client = max_pending_per_client
        self.ttl_s = ttl_s
        self._pending: dict[tuple[str, str], _Pending] = {}  # admitted: hold a buffer
        self._refused: dict[tuple[str, str], _Pending] = {}  # refused early: ticked off
        # Reassembly is bounded by the update size limit, not the generic blob limit.
        self._assembly_limits = replace(
            limits, max_blob_bytes=max(limits.max_blob_bytes, max_update_bytes)
        )
        self.dropped_busy = 0
        self.expired = 0
        self.grants = 0  # upload slots granted (paced uploads)
        self.resends = 0  # requests for chunks that went missing

    @property
    def pending(self) -> int:
        """Updates currently in reassembly or being ticked off."""
        return len(self._pending) + len(self._refused)

    def buffered_bytes(self) -> int:
        """Bytes allocated for updates in reassembly."""
        return sum(p.ref.size for p in self._pending.values() if p.assembler is not None)

    def _table(self, entry: _Pending) -> dict[tuple[str, str], _Pending]:
        return self._pending if entry.assembler is not None else self._refused

    def receive(
        self, topic: UpdateChunkTopic, payload: Buffer, now: float, admit: Gate
    ) -> IntakeEvent | None:
        """Handle one message received on ``update/<client>/<round>/<i>``."""
        try:
            chunk = decode_chunk(payload, self.limits)
        except LimitExceededError as exc:
            return ChunkProblem(topic.client, topic.round, "too_large", str(exc))
        except IntegrityError as exc:
            return ChunkProblem(topic.client, topic.round, "integrity", str(exc))
        except DecodeError as exc:
            return ChunkProblem(topic.client, topic.round, "malformed", str(exc))
        header = chunk.header
        problem = self._check_header(topic, header)
        if problem is not None:
            return problem
        assert header.update_id is not None  # decode_chunk guarantees it for update chunks
        key = UpdateKey(topic.client, topic.round, header.update_id)
        slot = (topic.client, header.update_id)
        entry = self._pending.get(slot) or self._refused.get(slot)
        if entry is not None and entry.signature != header.signature:
            problem = self._check_signature(topic, header)
            if problem is not None:
                return problem  # a forged chunk must not disturb the real send
        if entry is not None and (
            entry.ref != header.blob or entry.key != key or entry.signature != header.signature
        ):
            # Same update id with other bytes or round: the newest send wins.
            del self._table(entry)[slot]
            if entry.assembler is not None:
                self._release(entry)
            entry = None
        if entry is None:
            problem = self._check_signature(topic, header)
            if problem is not None:
                return problem
            started = self._start(key, header, now, admit)
            if isinstance(started, ChunkProblem):
                return started
            entry = started
            if entry.assembler is not None and entry.granted and self.upload_slots is not None:
                self._grant(entry)  # granted on arrival: ask for the rest at once
        entry.last_seen = now
        if entry.assembler is not None and entry.granted and not entry.grant_due:
            entry.resend_at = now + self.resend_after_s * 2 ** min(
                entry.resends, MAX_RESEND_DOUBLINGS
            )
        return self._add(slot, entry, header.index, chunk.payload)

    def _check_header(self, topic: UpdateChunkTopic, header: ChunkHeader) -> ChunkProblem | None:
        if header.kind != "update":
            return ChunkProblem(
                topic.client, topic.round, "malformed", "a blob chunk on an update topic"
            )
        if header.sender != topic.client:
            return ChunkProblem(
                topic.client,
                topic.round,
                "malformed",
                f"chunk signed by {header.sender!r} on {topic.client!r}'s update topic",
            )
        if header.round != topic.round or header.index != topic.index:
            return ChunkProblem(
                topic.client,
                topic.round,
                "malformed",
                f"chunk says round {header.round} index {header.index}, its topic "
                f"round {topic.round} index {topic.index}",
            )
        return None

    def _check_signature(self, topic: UpdateChunkTopic, header: ChunkHeader) -> ChunkProblem | None:
        if self.devices is None:
            return None
        key = self.devices.get(topic.client)
        if key is None:
            return ChunkProblem(
                topic.client, topic.round, "unknown_client", "not in the device registry"
            )
        if header.signature is None:
            return ChunkProblem(
                topic.client, topic.round, "bad_signature", "update chunk is not signed"
            )
        assert header.update_id is not None
        statement = update_statement(
            header.federation,
            topic.client,
            header.round,
            header.update_id,
            bytes.fromhex(header.blob.sha256),
            header.blob.size,
        )
        if not key.verify(statement, header.signature):
            return ChunkProblem(
                topic.client,
                topic.round,
                "bad_signature",
                f"update {header.update_id} is not signed by {topic.client!r}'s registered key",
            )
        return None

    def _busy(self, key: UpdateKey) -> ChunkProblem | None:
        if len(self._pending) < self.max_pending and (
            sum(1 for client, _ in self._pending if client == key.client)
            < self.max_pending_per_client
        ):
            return None
        self.dropped_busy += 1
        return ChunkProblem(
            key.client,
            key.round,
            "busy",
            f"{len(self._pending)} updates already in reassembly; chunk dropped, "
            "the agent re-sends",
        )

    def _start(
        self, key: UpdateKey, header: ChunkHeader, now: float, admit: Gate
    ) -> _Pending | ChunkProblem:
        verdict: Verdict | None
        if header.federation != self.federation:
            verdict = Verdict(False, "wrong_federation", f"chunk is for {header.federation!r}")
        elif header.blob.size > self.max_update_bytes:
            verdict = Verdict(
                False,
                "too_large",
                f"update declares {header.blob.size} bytes, limit {self.max_update_bytes}",
            )
        else:
            verdict = admit(header)
        entry = _Pending(key, header.blob, now, signature=header.signature)
        slot = (key.client, key.update_id)
        if verdict is None:
            busy = self._busy(key)
            if busy is not None:
                return busy
            entry.assembler = BlobAssembler(header.blob, self._assembly_limits)
            if self.upload_slots is not None and self.granted() >= self.upload_slots:
                entry.granted = False  # waits for a slot; its chunk 0 is kept meanwhile
            self._pending[slot] = entry
            return entry
        entry.verdict = verdict
        entry.seen = bytearray(header.blob.count)
        entry.unseen = header.blob.count
        if len(self._refused) >= REFUSED_PER_SLOT * self.max_pending:
            # Forget the oldest refused update: its sender re-sends and is judged again.
            del self._refused[next(iter(self._refused))]
        self._refused[slot] = entry
        return entry

    def _add(
        self, slot: tuple[str, str], entry: _Pending, index: int, payload: memoryview
    ) -> IntakeEvent | None:
        if entry.assembler is None:
            if not entry.seen[index]:
                entry.seen[index] = 1
                entry.unseen -= 1
            assert entry.verdict is not None
            if not entry.unseen:
                del self._refused[slot]
                if not entry.answered:
                    return Answered(entry.key, entry.verdict)
                return None
            if self.upload_slots is not None and index == 0:
                entry.answered = True  # a paced agent sends nothing but this first chunk
                return Answered(entry.key, entry.verdict)
            return None
        entry.assembler.add(index, payload)
        if not entry.assembler.complete:
            return None
        del self._pending[slot]
        self._release(entry)
        return Assembled(entry.key, entry.assembler)

    def granted(self) -> int:
        """Admitted updates in reassembly that may send all their chunks."""
        return sum(1 for entry in self._pending.values() if entry.granted)

    def set_upload_slots(self, slots: int | None) -> None:
        """Follow the announced ``upload_slots``; more slots grant waiting updates now."""
        if slots == self.upload_slots:
            return
        self.upload_slots = slots
        self._grant_waiting()

    def _release(self, entry: _Pending) -> None:
        """``entry`` left reassembly: its upload slot goes to the oldest waiting update."""
        if entry.granted:
            self._grant_waiting()

    def _grant_waiting(self) -> None:
        free = (
            len(self._pending) if self.upload_slots is None else self.upload_slots - self.granted()
        )
        for entry in self._pending.values():
            if free <= 0:
                break
            if not entry.granted:
                self._grant(entry)
                free -= 1

    def _grant(self, entry: _Pending) -> None:
        entry.granted = True
        entry.grant_due = True
        self.grants_ready = True

    def expire(self, now: float) -> list[ChunkProblem]:
        """Drop partial updates idle for more than ``ttl_s``."""
        for slot in [s for s, p in self._refused.items() if now - p.last_seen > self.ttl_s]:
            del self._refused[slot]  # nothing buffered: forgotten without a report
        stale = [slot for slot, p in self._pending.items() if now - p.last_seen > self.ttl_s]
        problems = []
        for slot in stale:
            entry = self._pending.pop(slot)
            self._release(entry)
            self.expired += 1
            have = entry.assembler.received if entry.assembler else entry.ref.count - entry.unseen
            problems.append(
                ChunkProblem(
                    entry.key.client,
                    entry.key.round,
                    "incomplete",
                    f"update {entry.key.update_id} dropped after {self.ttl_s:g} s idle with "
                    f"{have}/{entry.ref.count} chunks",
                )
            )
        return problems

    def resend_due(self, now: float) -> list[ResendDue]:
        """Admitted updates idle long enough to ask their senders for what is missing.

        Newly granted updates (paced uploads) are due at once: their request is the grant.
        """
        self.grants_ready = False
        due = []
        for entry in self._pending.values():
            if entry.assembler is None or not entry.granted:
                continue
            if entry.grant_due:
                entry.grant_due = False
                self.grants += 1
            elif entry.resend_at is None or entry.resend_at > now:
                continue
            else:
                self.resends += 1
                entry.resends += 1
            wait = self.resend_after_s * 2 ** min(entry.resends, MAX_RESEND_DOUBLINGS)
            entry.resend_at = now + wait
            missing = entry.assembler.missing()[:MAX_RESEND_INDICES]
            if missing:
                due.append(ResendDue(entry.key, entry.ref, missing))
        return due

    def next_expiry(self) -> float | None:
        """When the next partial update would expire or be asked for its missing chunks."""
        entries = [*self._pending.values(), *self._refused.values()]
        times = [p.last_seen + self.ttl_s for p in entries]
        times.extend(
            p.resend_at for p in self._pending.values() if p.granted and p.resend_at is not None
        )
        return min(times, default=None)
