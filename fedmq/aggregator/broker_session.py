"""The aggregator's MQTT session: what it subscribes to, its last will, its chunk size.

Setting the session up is the same on every start, whatever the service does with it
afterwards, so it is kept here, out of the service's control flow:
:func:`open_session` builds the session (agent statuses, update chunks and the blob
topics the :class:`~fedmq.coordinator.blob_guard.BlobGuard` keeps intact, with an
``offline`` status as last will), and :func:`broker_chunk_size` fits the chunk size to
the packet cap the broker states on every (re)connect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fedmq.aggregator.config import AggregatorSettings
from fedmq.coordinator.coordinator import Coordinator
from fedmq.transport.blobs import check_chunk_fits, fit_chunk_size
from fedmq.transport.broker_settings import LastWill
from fedmq.transport.mqtt import ConnectHook, MqttSession
from fedmq.wire.blobs import DEFAULT_CHUNK_SIZE
from fedmq.wire.control import AggregatorStatus, encode_control
from fedmq.wire.topics import Topics


def open_session(
    settings: AggregatorSettings,
    coordinator: Coordinator,
    on_connect: ConnectHook,
    clock: Callable[[], float],
) -> MqttSession:
    """The session of the aggregator ``settings`` describe, for ``coordinator``'s topics."""
    topics = coordinator.topics
    offline = AggregatorStatus(aggregator=settings.client_id, state="offline", ts=clock())
    return MqttSession(
        settings.broker_settings(),
        subscriptions=[
            (topics.status_filter(), 1),
            (topics.update_filter(), 1),
            (topics.blobs_filter(), 1),  # to repair retained chunks (BlobGuard)
        ],
        will=LastWill(
            topics.aggregator_status(), encode_control(offline, coordinator.config.signer)
        ),
        on_connect=on_connect,
        no_local=[topics.blobs_filter()],
    )


def broker_chunk_size(
    chunk_size: int | Literal["auto"], max_packet: int | None, topics: Topics
) -> int | None:
    """The chunk size for the broker's packet cap (None: the configured size, which fits).

    Raises:
        ConfigError: an explicit ``chunk_size`` does not fit the cap.
    """
    if chunk_size != "auto":
        check_chunk_fits(chunk_size, max_packet, topics, "stated by the broker")
        return None
    return fit_chunk_size(DEFAULT_CHUNK_SIZE, max_packet, topics)
