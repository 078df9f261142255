"""Moving whole blobs over a session: publish as retained chunks, fetch, clear."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fedmq.buffers import Buffer
from fedmq.errors import ConfigError
from fedmq.transport.mqtt import MqttSession, publish_packet_size
from fedmq.wire.blobs import MIN_CHUNK_SIZE, BlobRef
from fedmq.wire.chunks import ChunkKind, chunk_overhead, encode_blob_chunks
from fedmq.wire.ids import MAX_ID_LENGTH
from fedmq.wire.limits import KiB
from fedmq.wire.topics import MAX_ROUND, Topics

log = logging.getLogger(__name__)

PUBLISH_WINDOW = 32  # chunks in flight at once: pipelines the upload without flooding


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
