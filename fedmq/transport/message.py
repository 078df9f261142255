"""The message the transport hands to the rest of fedmq: topic, payload, retain flag.

Services and tests never see aiomqtt's or paho's message classes: the transport converts
each received message once, so only :mod:`fedmq.transport` depends on the MQTT client
library (and a change of client library stays inside it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Message:
    """One received MQTT message.

    Args:
        topic: the topic it was published on.
        payload: its bytes (empty for a retained-message deletion).
        retain: True if the broker delivered it from its retained store.
    """

    topic: str
    payload: bytes = field(repr=False)
    retain: bool = False


MessageHandler = Callable[[Message], Awaitable[None]]
"""What :meth:`~fedmq.transport.mqtt.MqttSession.run` feeds every received message to."""
