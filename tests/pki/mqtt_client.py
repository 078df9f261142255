"""A blocking paho-mqtt client for the broker tests: connect over mTLS, publish, observe.

Every wait is for an event (CONNACK, PUBACK, SUBACK, a message) with a timeout.  To show
that a message did NOT reach a subscriber, a test publishes an allowed *marker* after it
and waits for the marker: the broker decides on the denied publish before it sends the
publisher's PUBACK, so anything it had routed would sit before the marker in the
subscriber's queue.
"""

from __future__ import annotations

import contextlib
import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.pki.layout import CertPaths

TIMEOUT = 5.0  # seconds: every broker round trip here takes milliseconds


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class BrokerClient:
    """One MQTT 5 connection to the test broker (use as a context manager)."""

    def __init__(
        self,
        port: int,
        *,
        client_id: str,
        ca: Path | None,
        identity: CertPaths | None,
        tls: bool = True,
    ) -> None:
        self.port = port
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if tls:
            self._client.tls_set(
                ca_certs=str(ca) if ca else None,
                certfile=str(identity.cert) if identity else None,
                keyfile=str(identity.key) if identity else None,
            )
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.disconnects = 0
        self._outcome = threading.Event()
        self._lock = threading.Condition()
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connack = reason
        self._outcome.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.disconnects += 1
        self._outcome.set()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._pubacks[mid] = reason
            self._lock.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._subacks[mid] = reasons
            self._lock.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(message.topic, bytes(message.payload), bool(message.retain)))

    # ------------------------------------------------------------------ operations

    def connect(self, timeout: float = TIMEOUT) -> bool:
        """True when the broker accepted us (CONNACK success); False when it refused.

        Refusal shows as a failed handshake, a dropped connection or a CONNACK error,
        depending on the TLS version and where the broker stops us.
        """
        try:
            self._client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError):
            return False
        # Driven by hand until the outcome: paho's thread would retry a refused
        # connection after a one-second pause.
        deadline = time.monotonic() + timeout
        while not self._outcome.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("neither CONNACK nor a disconnect within the timeout")
            if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break  # the connection is gone (on_disconnect has run)
        accepted = (
            self.connack is not None and not self.connack.is_failure and self.disconnects == 0
        )
        if accepted:
            # From now on only the network thread touches the socket: with a
            # register-write hook, publish() queues the packet and wakes the thread
            # instead of writing to the TLS socket from the caller's thread.
            self._client.on_socket_register_write = _no_hook
            self._thread = threading.Thread(target=self._network, daemon=True)
            self._thread.start()
        return accepted

    def _network(self) -> None:
        # Not paho's loop_start(): its thread retries a refused connection after a
        # one-second pause, and it would open a second wake-up socket pair beside the
        # one loop() made above.  This loop never reconnects.
        while not self._stopping.is_set():
            if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                return

    def _wait(self, table: dict[int, object], mid: int, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        with self._lock:
            while mid not in table:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no acknowledgement of message {mid}")
                self._lock.wait(remaining)
            return table.pop(mid)

    def publish(
        self, topic: str, payload: bytes = b"x", *, retain: bool = False, timeout: float = TIMEOUT
    ) -> ReasonCode:
        """Publish at QoS 1; return the PUBACK's reason (MQTT 5: 0x87 when denied)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        reason = self._wait(self._pubacks, info.mid, timeout)  # type: ignore[arg-type]
        assert isinstance(reason, ReasonCode)
        return reason

    def subscribe(self, topic_filter: str, timeout: float = TIMEOUT) -> list[ReasonCode]:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        _, mid = self._client.subscribe(topic_filter, qos=1)
        assert mid is not None
        reasons = self._wait(self._subacks, mid, timeout)  # type: ignore[arg-type]
        assert isinstance(reasons, list)
        return reasons

    def until(self, topic: str, payload: bytes, timeout: float = TIMEOUT) -> list[Received]:
        """Every message received up to the one on ``topic`` with ``payload``, that one last."""
        deadline = time.monotonic() + timeout
        seen: list[Received] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no marker on {topic} (received {seen})")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append(message)
            if message.topic == topic and message.payload == payload:
                return seen

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(TIMEOUT)  # the thread sends the DISCONNECT, then ends
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(TIMEOUT)

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_hook(client: mqtt.Client, userdata: object, sock: object) -> None:
    return None


def marker() -> bytes:
    """A payload no other message carries."""
    return f"marker-{uuid.uuid4().hex}".encode()
