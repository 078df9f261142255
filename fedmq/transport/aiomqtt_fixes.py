"""Workarounds for aiomqtt 2.x and paho behaviours the session depends on.

Each reaches into a private attribute of aiomqtt or paho, so they live here, together,
where an upgrade of either is checked (tests/transport/test_session.py exercises them).
"""

from __future__ import annotations

import asyncio

import aiomqtt


def raise_if_cancelling(cause: BaseException | None) -> None:
    """Re-raise a cancellation aiomqtt swallowed.

    aiomqtt waits with ``asyncio.wait_for``, which on Python 3.11 drops a cancellation
    that arrives as the awaited operation completes or fails (a connection dropped
    under a cancelled publisher does both).  The caller would then carry on as if
    never cancelled, and a task group waiting for it would hang.
    """
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError from cause


def drop_pending(client: aiomqtt.Client, topic: str, payload: bytes) -> None:
    """Remove an unacknowledged publish from paho's queue of messages to retransmit."""
    paho = client._client
    with paho._out_message_mutex:
        for mid, message in list(paho._out_messages.items()):
            if message.topic == topic and message.payload == payload:
                del paho._out_messages[mid]


def forget_last_connection(client: aiomqtt.Client) -> None:
    """Make a reused aiomqtt client wait for the next CONNACK (aiomqtt 2.x bug).

    After an unexpected disconnect aiomqtt leaves its "connected" future done, so the
    next ``__aenter__`` returns before the broker has answered: a refused CONNECT would
    go unnoticed and a disconnect right after it would be lost.
    """
    if client._connected.done():
        if not client._connected.cancelled():
            client._connected.exception()  # retrieved: no "never retrieved" warning
        client._connected = asyncio.get_running_loop().create_future()
    if client._disconnected.done() and not client._disconnected.cancelled():
        client._disconnected.exception()  # aiomqtt replaces it without looking
