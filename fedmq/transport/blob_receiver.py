"""Fetching blobs: reassemble retained chunks, verify, recover what a broker dropped.

A blob is fetched by subscribing to all its chunk topics at once: the broker delivers
every retained chunk.  A broker past its queue limit drops some of those deliveries
silently, and would drop the same ones again on every resubscribe to the whole blob.
So a download that gets no new chunk for ``stall_s`` switches to the missing chunks'
own topics, ``window`` at a time (each subscribe delivers one retained chunk), which
fits any queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedmq.buffers import Buffer
from fedmq.errors import DecodeError, IntegrityError, TransportError
from fedmq.timeouts import within
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.blobs import BlobAssembler, BlobRef
from fedmq.wire.chunks import decode_chunk
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits
from fedmq.wire.topics import BlobChunkTopic, Topics

log = logging.getLogger(__name__)

# Refetches of a blob whose reassembled bytes fail the sha256 check before the fetch
# fails: a corrupt *retained* chunk is re-delivered identically on every resubscribe, so
# retrying forever would only hammer the broker.
MAX_REFETCHES = 3
DOWNLOAD_STALL = 2.0  # seconds without a new chunk before the missing ones are asked for
DOWNLOAD_WINDOW = 8  # chunk topics subscribed one by one at once


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

    def missing(self) -> list[int]:
        """Indices of the chunks not yet present, ascending."""
        ...

    def finish(self) -> bytearray:
        """The verified blob; raises IntegrityError (and forgets every chunk) on mismatch."""
        ...


ChunkStoreFactory = Callable[[BlobRef, DecodeLimits], ChunkStore]


@dataclass
class _Fetch:
    """One blob being fetched."""

    store: ChunkStore
    future: asyncio.Future[bytearray]
    progress_at: float  # loop time of the last new chunk (or of the last re-ask)
    failures: int = 0  # sha256 mismatches so far
    singles: set[int] = field(default_factory=set)  # chunk topics subscribed one by one
    watch: asyncio.Task[None] | None = None


class BlobReceiver:
    """Reassembles blobs from chunk messages delivered by a session's handler.

    Register a wanted blob with :meth:`want`, feed every message on a blob topic to
    :meth:`feed`, and await the future (or :meth:`fetch`) for the verified bytes.
    Corrupt chunks are dropped with a log line (a later copy may be good); a blob that
    fails its sha256 check is refetched by resubscribing, which makes the broker resend
    retained chunks; after ``max_refetches`` such failures the fetch fails with
    ``IntegrityError``.  A download that stalls asks for its missing chunks one topic at
    a time (module docstring).

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
        stall_s: float = DOWNLOAD_STALL,
        window: int = DOWNLOAD_WINDOW,
    ) -> None:
        self._session = session
        self._topics = topics
        self._limits = limits
        self._pending: dict[str, _Fetch] = {}
        self._on_progress = on_progress
        self._store_factory = store_factory
        self._max_refetches = max_refetches
        self._stall_s = stall_s
        self._window = window
        self.rejected_chunks = 0
        self.refetches = 0
        self.stalls = 0  # downloads that had to ask for missing chunks one by one

    async def want(self, ref: BlobRef) -> asyncio.Future[bytearray]:
        """Start fetching ``ref``; the future resolves to the verified blob."""
        fetch = self._pending.get(ref.sha256)
        if fetch is not None:
            return fetch.future
        loop = asyncio.get_running_loop()
        fetch = _Fetch(self._store_factory(ref, self._limits), loop.create_future(), loop.time())
        self._pending[ref.sha256] = fetch
        await self._session.subscribe(self._topics.blob_filter(ref.sha256), qos=1)
        fetch.watch = asyncio.create_task(
            self._watch(ref.sha256, fetch), name=f"fedmq.blob-watch-{ref.sha256[:12]}"
        )
        return fetch.future

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
            fetch = self._pending.get(ref.sha256)
            got = fetch.store.received if fetch else 0
            raise TransportError(
                f"blob {ref.sha256[:12]}… incomplete after {timeout:g} s ({got}/{ref.count} chunks)"
            ) from None

    async def cancel(self, ref: BlobRef) -> None:
        """Stop fetching ``ref``."""
        fetch = self._pending.get(ref.sha256)
        if fetch is not None:
            fetch.future.cancel()
            await self._forget(ref.sha256, fetch)

    async def feed(self, message: Message, parsed: BlobChunkTopic) -> None:
        """Handle one message received on a blob topic."""
        fetch = self._pending.get(parsed.sha256)
        payload = message.payload
        if fetch is None or not payload:
            return  # not wanted (any more), or a retained-message deletion
        store, future = fetch.store, fetch.future
        try:
            chunk = decode_chunk(payload, self._limits)
            if chunk.header.blob != store.ref or chunk.header.index != parsed.index:
                raise IntegrityError(
                    f"chunk on topic {message.topic} describes blob "
                    f"{chunk.header.blob.sha256[:12]}… chunk {chunk.header.index}"
                )
            fresh = store.add(chunk.header.index, chunk.payload)
        except (DecodeError, IntegrityError) as exc:
            self.rejected_chunks += 1
            log.warning("rejected chunk on %s: %s", message.topic, exc)
            return
        except OSError as exc:
            await self._give_up(parsed.sha256, fetch, exc)
            return
        if fresh:
            fetch.progress_at = asyncio.get_running_loop().time()
            if parsed.index in fetch.singles:
                await self._next_single(parsed.sha256, fetch, parsed.index)
            if self._on_progress is not None:
                result = self._on_progress(store.ref, store.received)
                if result is not None:
                    await result
        if not store.complete or future.done():
            return
        sha256 = store.ref.sha256
        try:
            blob = store.finish()
        except OSError as exc:
            await self._give_up(sha256, fetch, exc)
            return
        except IntegrityError as exc:
            fetch.failures += 1
            if fetch.failures > self._max_refetches:
                log.warning("%s; giving up after %d refetches", exc, fetch.failures - 1)
                await self._forget(sha256, fetch)
                future.set_exception(
                    IntegrityError(f"{exc} (still wrong after {fetch.failures - 1} refetches)")
                )
                return
            self.refetches += 1
            log.warning("%s; fetching it again", exc)
            await self._unsubscribe_all(sha256, fetch)
            await self._session.subscribe(self._topics.blob_filter(sha256), qos=1)
            return
        await self._forget(sha256, fetch)
        future.set_result(blob)

    async def _watch(self, sha256: str, fetch: _Fetch) -> None:
        """Ask for the missing chunks one topic at a time whenever the download stalls."""
        loop = asyncio.get_running_loop()
        while not fetch.future.done():
            await asyncio.sleep(self._stall_s)
            idle = loop.time() - fetch.progress_at
            if idle < self._stall_s or fetch.store.complete or fetch.future.done():
                continue
            missing = fetch.store.missing()
            if not fetch.singles:
                self.stalls += 1
                log.info(
                    "blob %s…: no chunk for %.0f s with %d/%d missing (dropped by the "
                    "broker?): asking for them one by one",
                    sha256[:12],
                    idle,
                    len(missing),
                    fetch.store.ref.count,
                )
            await self._unsubscribe_all(sha256, fetch)
            for index in missing[: self._window]:
                fetch.singles.add(index)
                await self._session.subscribe(self._topics.blob(sha256, index), qos=1)
            fetch.progress_at = loop.time()

    async def _next_single(self, sha256: str, fetch: _Fetch, arrived: int) -> None:
        """Chunk ``arrived`` came on its own topic: move the window to the next missing."""
        fetch.singles.discard(arrived)
        await self._session.unsubscribe(self._topics.blob(sha256, arrived))
        for index in fetch.store.missing():
            if index not in fetch.singles:
                fetch.singles.add(index)
                await self._session.subscribe(self._topics.blob(sha256, index), qos=1)
                return

    async def _unsubscribe_all(self, sha256: str, fetch: _Fetch) -> None:
        await self._session.unsubscribe(self._topics.blob_filter(sha256))
        for index in sorted(fetch.singles):
            await self._session.unsubscribe(self._topics.blob(sha256, index))
        fetch.singles.clear()

    async def _forget(self, sha256: str, fetch: _Fetch) -> None:
        if self._pending.get(sha256) is fetch:
            del self._pending[sha256]
        watch = fetch.watch
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await self._unsubscribe_all(sha256, fetch)

    async def _give_up(self, sha256: str, fetch: _Fetch, exc: OSError) -> None:
        # The chunk store cannot write (a full disk, a read-only or failing device):
        # waiting for more chunks cannot help, so the fetch fails now with the reason
        # instead of at its timeout.
        log.warning("cannot store blob %s…: %s", sha256[:12], exc)
        await self._forget(sha256, fetch)
        if not fetch.future.done():
            fetch.future.set_exception(exc)
