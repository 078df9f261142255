"""Moving whole blobs over a session: publish as retained chunks, fetch, clear."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from fedmq.buffers import Buffer
from fedmq.errors import ConfigError, DecodeError, IntegrityError, TransportError
from fedmq.timeouts import within
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession, publish_packet_size
from fedmq.wire.blobs import MIN_CHUNK_SIZE, BlobAssembler, BlobRef
from fedmq.wire.chunks import ChunkKind, chunk_overhead, decode_chunk, encode_blob_chunks
from fedmq.wire.ids import MAX_ID_LENGTH
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits, KiB
from fedmq.wire.topics import MAX_ROUND, BlobChunkTopic, Topics

log = logging.getLogger(__name__)

PUBLISH_WINDOW = 32  # chunks in flight at once: pipelines the upload without flooding
# Refetches of a blob whose reassembled bytes fail the sha256 check before the fetch
# fails: a corrupt *retained* chunk is re-delivered identically on every resubscribe, so
# retrying forever would only hammer the broker.
MAX_REFETCHES = 3


class ChunkStore(Protocol):
    """Where a :class:`BlobReceiver` puts the chunks of one blob.

    :class:`~fedmq.wire.blobs.BlobAssembler` (memory) is the default; an agent plugs in
    a disk-backed store so a partial download survives a restart.
    """

    @property
    def ref(self) -> BlobRef:
        """The blob being assembled."""
        ...

    @property
    def complete(self) -> bool:
        """True when every chunk is present."""
        ...

    @property
    def received(self) -> int:
        """Number of distinct chunks present."""
        ...

    def add(self, index: int, payload: Buffer) -> bool:
        """Store chunk ``index``; False for a duplicate.

        An ``OSError`` (the store cannot write) fails the fetch at once.
        """
        ...

    def finish(self) -> bytearray:
        """The verified blob; raises IntegrityError (and forgets every chunk) on mismatch."""
        ...


ChunkStoreFactory = Callable[[BlobRef, DecodeLimits], ChunkStore]


def max_chunk_size(max_packet: int, topics: Topics) -> int:
    """The largest chunk whose message fits a ``max_packet``-byte MQTT packet.

    Counts the worst case: the longest chunk topic of the federation (an update of a
    64-character client id at the highest round and chunk index) and a chunk header with
    every field at its largest.  Rounded down to whole KiB.

    Raises:
        ConfigError: the cap is too small for even the smallest chunk.
    """
    longest_topic = max(
        publish_packet_size(topics.update("x" * MAX_ID_LENGTH, MAX_ROUND - 1, 99_999), 0),
        publish_packet_size(topics.blob("f" * 64, 99_999), 0),
    )
    room = (max_packet - longest_topic - chunk_overhead()) // KiB * KiB
    if room < MIN_CHUNK_SIZE:
        raise ConfigError(
            f"the broker's maximum packet size of {max_packet} bytes leaves no room for a "
            f"{MIN_CHUNK_SIZE}-byte chunk with its headers"
        )
    return room


def fit_chunk_size(chunk_size: int, max_packet: int | None, topics: Topics) -> int:
    """``chunk_size``, or the largest chunk that fits the broker's packets if smaller."""
    if max_packet is None:
        return chunk_size
    return min(chunk_size, max_chunk_size(max_packet, topics))


def check_chunk_fits(chunk_size: int, max_packet: int | None, topics: Topics, source: str) -> None:
    """Raise if an explicit ``chunk_size`` does not fit the broker's packet cap.

    Raises:
        ConfigError: naming the setting, the cap and the largest chunk that fits.
    """
    if max_packet is None:
        return
    largest = max_chunk_size(max_packet, topics)
    if chunk_size > largest:
        raise ConfigError(
            f"chunk_size = {chunk_size} does not fit the broker's maximum packet size of "
            f"{max_packet} bytes ({source}): chunks of at most {largest} bytes fit with "
            'their headers; set chunk_size = "auto" or a value up to that'
        )


async def publish_chunks(
    session: MqttSession,
    data: Buffer,
    ref: BlobRef,
    topic_of: Callable[[int], str],
    *,
    kind: ChunkKind,
    federation: str,
    sender: str,
    round_id: int,
    update_id: str | None = None,
    signature: bytes | None = None,
    retain: bool = False,
    indices: set[int] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Publish the chunks of ``data`` with QoS 1, ``PUBLISH_WINDOW`` at a time.

    Returns when the broker has acknowledged every chunk.  ``indices`` limits the
    upload to some chunks (a resumed upload); ``on_chunk`` reports progress;
    ``signature`` is the device's signature of the update, carried by every chunk.

    Raises:
        TransportError: a chunk could not be published.
    """
    window = asyncio.Semaphore(PUBLISH_WINDOW)

    async def send(index: int, message: bytes) -> None:
        try:
            await session.publish(topic_of(index), message, qos=1, retain=retain)
        finally:
            window.release()
        if on_chunk is not None:
            on_chunk(index)

    async with asyncio.TaskGroup() as group:
        for index, message in encode_blob_chunks(
            data,
            ref,
            kind=kind,
            federation=federation,
            sender=sender,
            round_id=round_id,
            update_id=update_id,
            signature=signature,
        ):
            if indices is not None and index not in indices:
                continue
            await window.acquire()
            group.create_task(send(index, message))


async def publish_blob(
    session: MqttSession,
    topics: Topics,
    data: Buffer,
    ref: BlobRef,
    *,
    sender: str,
    round_id: int,
    indices: frozenset[int] | None = None,
) -> None:
    """Publish a blob as retained chunks on ``…/blob/<sha256>/<i>`` (only ``indices``)."""
    await publish_chunks(
        session,
        data,
        ref,
        lambda index: topics.blob(ref.sha256, index),
        kind="blob",
        federation=topics.federation,
        sender=sender,
        round_id=round_id,
        retain=True,
        indices=set(indices) if indices is not None else None,
    )


async def clear_blob(session: MqttSession, topics: Topics, ref: BlobRef, first: int = 0) -> None:
    """Delete a blob's retained chunks from ``first`` on (an empty retained message clears)."""
    async with asyncio.TaskGroup() as group:
        for index in range(first, ref.count):
            group.create_task(
                session.publish(topics.blob(ref.sha256, index), b"", qos=1, retain=True)
            )


class BlobReceiver:
    """Reassembles blobs from chunk messages delivered by a session's handler.

    Register a wanted blob with :meth:`want`, feed every message on a blob topic to
    :meth:`feed`, and await :meth:`wait` for the verified bytes.  Corrupt chunks are
    dropped with a log line (a later copy may be good); a blob that fails its sha256
    check is refetched by resubscribing, which makes the broker resend retained chunks;
    after ``max_refetches`` such failures the fetch fails with ``IntegrityError``.

    ``store_factory`` decides where chunks are kept (default: in memory).
    """

    def __init__(
        self,
        session: MqttSession,
        topics: Topics,
        limits: DecodeLimits = DEFAULT_LIMITS,
        on_progress: Callable[[BlobRef, int], Awaitable[None] | None] | None = None,
        *,
        store_factory: ChunkStoreFactory = BlobAssembler,
        max_refetches: int = MAX_REFETCHES,
    ) -> None:
        self._session = session
        self._topics = topics
        self._limits = limits
        self._pending: dict[str, tuple[ChunkStore, asyncio.Future[bytearray]]] = {}
        self._failures: dict[str, int] = {}
        self._on_progress = on_progress
        self._store_factory = store_factory
        self._max_refetches = max_refetches
        self.rejected_chunks = 0
        self.refetches = 0

    async def want(self, ref: BlobRef) -> asyncio.Future[bytearray]:
        """Start fetching ``ref``; the future resolves to the verified blob."""
        entry = self._pending.get(ref.sha256)
        if entry is not None:
            return entry[1]
        future: asyncio.Future[bytearray] = asyncio.get_running_loop().create_future()
        self._pending[ref.sha256] = (self._store_factory(ref, self._limits), future)
        self._failures[ref.sha256] = 0
        await self._session.subscribe(self._topics.blob_filter(ref.sha256), qos=1)
        return future

    async def fetch(self, ref: BlobRef, timeout: float) -> bytearray:
        """Fetch ``ref`` and wait for it.

        Raises:
            TransportError: the blob was not complete within ``timeout`` seconds.
            OSError: the chunk store could not write (at once, not at the timeout).
        """
        future = await self.want(ref)
        try:
            return await within(asyncio.shield(future), timeout)
        except TimeoutError:
            entry = self._pending.get(ref.sha256)
            got = entry[0].received if entry else 0
            raise TransportError(
                f"blob {ref.sha256[:12]}… incomplete after {timeout:g} s ({got}/{ref.count} chunks)"
            ) from None

    async def cancel(self, ref: BlobRef) -> None:
        """Stop fetching ``ref``."""
        entry = self._pending.pop(ref.sha256, None)
        self._failures.pop(ref.sha256, None)
        if entry is not None:
            entry[1].cancel()
            await self._session.unsubscribe(self._topics.blob_filter(ref.sha256))

    async def feed(self, message: Message, parsed: BlobChunkTopic) -> None:
        """Handle one message received on a blob topic."""
        entry = self._pending.get(parsed.sha256)
        payload = message.payload
        if entry is None or not payload:
            return  # not wanted (any more), or a retained-message deletion
        assembler, future = entry
        try:
            chunk = decode_chunk(payload, self._limits)
            if chunk.header.blob != assembler.ref or chunk.header.index != parsed.index:
                raise IntegrityError(
                    f"chunk on topic {message.topic} describes blob "
                    f"{chunk.header.blob.sha256[:12]}… chunk {chunk.header.index}"
                )
            fresh = assembler.add(chunk.header.index, chunk.payload)
        except (DecodeError, IntegrityError) as exc:
            self.rejected_chunks += 1
            log.warning("rejected chunk on %s: %s", message.topic, exc)
            return
        except OSError as exc:
            await self._give_up(assembler.ref, future, exc)
            return
        if fresh and self._on_progress is not None:
            result = self._on_progress(assembler.ref, assembler.received)
            if result is not None:
                await result
        if not assembler.complete or future.done():
            return
        sha256 = assembler.ref.sha256
        blob_filter = self._topics.blob_filter(sha256)
        try:
            blob = assembler.finish()
        except OSError as exc:
            await self._give_up(assembler.ref, future, exc)
            return
        except IntegrityError as exc:
            failures = self._failures.get(sha256, 0) + 1
            self._failures[sha256] = failures
            if failures > self._max_refetches:
                log.warning("%s; giving up after %d refetches", exc, failures - 1)
                del self._pending[sha256]
                self._failures.pop(sha256, None)
                await self._session.unsubscribe(blob_filter)
                future.set_exception(
                    IntegrityError(f"{exc} (still wrong after {failures - 1} refetches)")
                )
                return
            self.refetches += 1
            log.warning("%s; fetching it again", exc)
            await self._session.unsubscribe(blob_filter)
            await self._session.subscribe(blob_filter, qos=1)
            return
        del self._pending[sha256]
        self._failures.pop(sha256, None)
        await self._session.unsubscribe(blob_filter)
        future.set_result(blob)

    async def _give_up(self, ref: BlobRef, future: asyncio.Future[bytearray], exc: OSError) -> None:
        # The chunk store cannot write (a full disk, a read-only or failing device):
        # waiting for more chunks cannot help, so the fetch fails now with the reason
        # instead of at its timeout.
        log.warning("cannot store blob %s…: %s", ref.sha256[:12], exc)
        self._pending.pop(ref.sha256, None)
        self._failures.pop(ref.sha256, None)
        await self._session.unsubscribe(self._topics.blob_filter(ref.sha256))
        if not future.done():
            future.set_exception(exc)
