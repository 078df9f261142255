"""The one MQTT session fedmq services use: connect, resubscribe, reconnect with backoff.

This layer only moves bytes.  Everything it receives goes to a handler coroutine;
everything the protocol wants sent goes through :meth:`MqttSession.publish`.  The
reconnect loop is written once here for the aggregator, the agents and the monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmq.backoff import Backoff
from fedmq.errors import TransportError
from fedmq.timeouts import wait_event
from fedmq.transport.aiomqtt_fixes import (
    drop_pending,
    forget_last_connection,
    raise_if_cancelling,
)
from fedmq.transport.broker_settings import BrokerSettings, LastWill
from fedmq.transport.message import Message, MessageHandler
from fedmq.transport.takeover import SESSION_TAKEN_OVER, TakeoverWatch

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds: TCP + TLS + CONNACK on a slow plant network
DISCONNECT_TIMEOUT = 1.0  # seconds: a clean DISCONNECT at shutdown is best effort
PUBLISH_TIMEOUT = 30.0  # seconds: one QoS 1 round trip, including a reconnect
MAX_INFLIGHT = 200  # QoS 1 messages unacknowledged at once: keeps chunk uploads pipelined

ConnectHook = Callable[["MqttSession"], Awaitable[None]]


class PacketTooLargeError(TransportError):
    """A message would exceed the broker's maximum packet size (never sent)."""


class BrokerRefusedError(TransportError):
    """The broker keeps closing the connection on one publish (an unannounced size cap)."""


# A large publish during which the connection dropped this often is blamed on its size:
# brokers close the connection on an oversized packet, and 3.1.1 ones never say so.
SUSPECT_DROPS = 2
SUSPECT_SIZE = 16 * 1024  # bytes


# MQTT PUBLISH bytes besides topic and payload: fixed header (1 + up to 4 bytes of
# remaining length), topic length (2), packet id (2), MQTT 5 property length (up to 4).
PUBLISH_OVERHEAD = 13


def publish_packet_size(topic: str, payload_size: int) -> int:
    """Upper bound of the PUBLISH packet carrying ``payload_size`` bytes on ``topic``."""
    return PUBLISH_OVERHEAD + len(topic.encode()) + payload_size


def _to_message(received: aiomqtt.Message) -> Message:
    payload = received.payload
    # aiomqtt types payloads as str | bytes | int | float | None; over the wire they are
    # always bytes (paho hands out bytes), the other types exist only for publishing.
    data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
    return Message(received.topic.value, data, bool(received.retain))


class MqttSession:
    """A reconnecting MQTT session around one aiomqtt client.

    Call :meth:`run` in a task; it connects, subscribes to every filter in
    ``subscriptions`` (again after each reconnect), calls ``on_connect``, then feeds
    every message to the handler until cancelled.  :meth:`publish` waits for a
    connection if there is none (up to its timeout).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        will: LastWill | None = None,
        on_connect: ConnectHook | None = None,
        backoff: Backoff | None = None,
        max_queued_incoming: int = 0,
        no_local: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self._address = settings.address
        self._subscriptions: dict[str, int] = dict(subscriptions)
        self._will = will
        self._on_connect = on_connect
        self._backoff = backoff or Backoff()
        self._max_queued_incoming = max_queued_incoming
        # Filters whose matches we publish ourselves: on MQTT 5 the broker does not echo
        # our own messages back (they would take room in our queue for nothing).
        self._no_local = frozenset(no_local)
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._unsubscribing: set[str] = set()  # unsubscribes not acknowledged yet
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self.connections = 0  # successful connects so far (1 after the first)
        self.bytes_received = 0  # payload bytes of the messages handed to the handler
        self.bytes_sent = 0  # payload bytes of the publishes the broker accepted
        self.last_error: str | None = None
        self._connack_max_packet: int | None = None  # from the latest CONNACK (MQTT 5)
        self._lost = asyncio.Event()  # set when the current connection ends
        self._takeover_watch = TakeoverWatch(settings.client_id)
        self._connected_at = 0.0

    @property
    def max_packet_size(self) -> int | None:
        """The largest packet the broker accepts (None: unknown, no cap).

        The smaller of the configured ``max_packet_size`` and the Maximum Packet Size of
        the latest MQTT 5 CONNACK.
        """
        caps = [c for c in (self.settings.max_packet_size, self._connack_max_packet) if c]
        return min(caps, default=None)

    def check_fits(self, topic: str, payload_size: int) -> None:
        """Raise if a publish of ``payload_size`` bytes on ``topic`` would exceed the cap.

        Raises:
            PacketTooLargeError: naming the topic, the size and the cap.
        """
        cap = self.max_packet_size
        size = publish_packet_size(topic, payload_size)
        if cap is not None and size > cap:
            raise PacketTooLargeError(
                f"publish to {topic} would be a {size}-byte packet, over the broker's "
                f"maximum packet size of {cap} bytes"
            )

    @property
    def is_connected(self) -> bool:
        """True while a connection is up."""
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected.

        Raises:
            TransportError: not connected within ``timeout`` seconds.
        """
        if not await wait_event(self._connected, timeout):
            raise TransportError(
                f"no connection to {self.settings.url} within {timeout:g} s"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            ) from None

    def _make_client(self) -> aiomqtt.Client:
        settings = self.settings
        version_5 = settings.protocol == "5"
        properties: Properties | None = None
        if version_5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = (
                settings.session_expiry if settings.persistent_session else 0
            )
        will = None
        if self._will is not None:
            will = aiomqtt.Will(
                self._will.topic, self._will.payload, self._will.qos, self._will.retain
            )
        client = aiomqtt.Client(
            self._address.host,
            self._address.port,
            identifier=settings.client_id,
            username=settings.username,
            password=settings.password,
            protocol=aiomqtt.ProtocolVersion.V5 if version_5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=None if version_5 else not settings.persistent_session,
            # paho refuses clean_start under 3.1.1 unless it is left at its default.
            clean_start=(
                not settings.persistent_session if version_5 else MQTT_CLEAN_START_FIRST_ONLY
            ),
            keepalive=settings.keepalive,
            timeout=CONNECT_TIMEOUT,
            properties=properties,
            tls_context=settings.tls_context(),
            max_inflight_messages=MAX_INFLIGHT,
            max_queued_incoming_messages=self._max_queued_incoming,
        )
        # Pipelined chunk uploads keep many publishes pending by design; aiomqtt would
        # log a warning for every one beyond 10.
        client.pending_calls_threshold = MAX_INFLIGHT
        # aiomqtt drops the CONNACK properties; the broker's Maximum Packet Size is in them.
        paho = client._client
        on_connect = paho.on_connect

        def capture_connack(*args: Any) -> None:
            properties = args[4] if len(args) > 4 else None
            cap = getattr(properties, "MaximumPacketSize", None)
            self._connack_max_packet = int(cap) if cap else None
            if on_connect is not None:
                on_connect(*args)

        paho.on_connect = capture_connack
        return client

    async def run(self, handler: MessageHandler) -> None:
        """Stay connected and feed every received message to ``handler`` until cancelled.

        A handler exception is a bug in the caller: it is logged with its traceback and
        the session goes on, so one bad message cannot stop a service.
        """
        client = self._make_client()
        while True:
            try:
                forget_last_connection(client)
                async with client:
                    try:
                        # A cancellation that arrived while aiomqtt connected may have
                        # been swallowed (raise_if_cancelling): serving on would ignore
                        # the stop for as long as the connection lasts.
                        raise_if_cancelling(None)
                        await self._serve(client, handler)
                    except asyncio.CancelledError:
                        # Leaving now: bound the graceful DISCONNECT the context manager
                        # sends on exit, which otherwise waits the full connect timeout.
                        client.timeout = DISCONNECT_TIMEOUT
                        raise
            except aiomqtt.MqttError as exc:
                # aiomqtt's exit may raise MqttError while we are being cancelled;
                # swallowing it would keep a stopped service reconnecting forever.
                raise_if_cancelling(exc)
                was_connected = self._connected.is_set()
                self._note_takeover(exc, was_connected)
                self.last_error = str(exc) or type(exc).__name__
                log.warning(
                    "%s %s: %s",
                    "lost connection to" if was_connected else "cannot connect to",
                    self.settings.url,
                    self.last_error,
                )
            finally:
                self._connected.clear()
                self._lost.set()
                self._client = None
                for task in self._control_tasks:
                    task.cancel()  # acks that can no longer come
            await asyncio.sleep(self._backoff.next_delay())

    def _note_takeover(self, error: aiomqtt.MqttError, was_connected: bool) -> None:
        """Stop, rather than fight forever, when another client keeps using our id."""
        now = asyncio.get_running_loop().time()
        # The reason code is on the error, or on its cause ("Disconnected during message
        # iteration" wraps the disconnect's MqttCodeError).
        codes = [getattr(e, "rc", None) for e in (error, error.__cause__) if e is not None]
        self._takeover_watch.connection_ended(
            taken_over=SESSION_TAKEN_OVER in [getattr(code, "value", code) for code in codes],
            lasted=now - self._connected_at if was_connected else None,
            now=now,
        )

    async def _serve(self, client: aiomqtt.Client, handler: MessageHandler) -> None:
        paho = client._client
        if paho.socket() is None or not paho.is_connected():
            # aiomqtt forgets a disconnect that lands between CONNACK and the end of its
            # __aenter__ (it resets its "disconnected" future), and the session would sit
            # on a dead connection; a broker resetting an oversized retransmission does
            # exactly that.
            raise aiomqtt.MqttError("the connection dropped right after the CONNACK")
        self._client = client
        self._lost = asyncio.Event()
        client.timeout = CONNECT_TIMEOUT
        # Copies: other tasks may (un)subscribe while we await the acks.
        for topic_filter, qos in list(self._subscriptions.items()):
            if topic_filter in self._no_local and self.settings.protocol == "5":
                options = SubscribeOptions(qos=qos, noLocal=True)
                await client.subscribe(topic_filter, options=options)
            else:
                await client.subscribe(topic_filter, qos)
        for topic_filter in list(self._unsubscribing):
            self._send_unsubscribe(topic_filter)
        raise_if_cancelling(None)  # the subscribes' waits may have swallowed a stop too
        self.connections += 1
        self.last_error = None
        self._backoff.reset()
        self._connected_at = asyncio.get_running_loop().time()
        self._connected.set()
        log.info("connected to %s as %s", self.settings.url, self.settings.client_id)
        if self._on_connect is not None:
            await self._on_connect(self)
        async for received in client.messages:
            message = _to_message(received)
            self.bytes_received += len(message.payload)
            try:
                await handler(message)
            except Exception:
                log.exception("handler failed on a message on %s", message.topic)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        """Publish one message; for QoS 1, return once the broker has acknowledged it.

        Raises:
            PacketTooLargeError: the message does not fit the broker's packet cap.
            TransportError: no connection came up, or the broker did not acknowledge
                within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        drops = 0
        while True:
            await self.wait_connected(max(0.0, deadline - loop.time()))
            client = self._client
            if client is None:
                continue
            # Never attempt it: a broker closes the connection on an oversized packet,
            # and the publish would only time out after reconnect after reconnect.
            self.check_fits(topic, len(payload))
            lost = self._lost
            attempt = asyncio.ensure_future(
                client.publish(
                    topic, payload, qos=qos, retain=retain, timeout=max(0.1, deadline - loop.time())
                )
            )
            dropped = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({attempt, dropped}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                attempt.cancel()
                raise
            finally:
                dropped.cancel()
            if not attempt.done():
                # The connection dropped before the broker acknowledged: publish again on
                # the next connection now, rather than when aiomqtt's wait times out.
                attempt.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await attempt
                # paho would retransmit it on the next connection by itself: a duplicate
                # at best, and a connection reset after every reconnect for a message the
                # broker refuses.  We publish it again ourselves.
                drop_pending(client, topic, payload)
                drops += 1
                if drops >= SUSPECT_DROPS and len(payload) >= SUSPECT_SIZE:
                    raise BrokerRefusedError(
                        f"the broker closed the connection {drops} times while receiving a "
                        f"{len(payload)}-byte publish to {topic}: it is probably larger than "
                        "the broker's max_packet_size (MQTT 3.1.1 brokers do not announce "
                        "it: set max_packet_size in the [broker] table)"
                    )
                continue
            try:
                attempt.result()
            except aiomqtt.MqttError as exc:
                raise_if_cancelling(exc)
                if loop.time() >= deadline:
                    raise TransportError(f"publish to {topic} failed: {exc}") from exc
                # The connection dropped under us; the run loop is reconnecting.
                await asyncio.sleep(0.05)
            else:
                raise_if_cancelling(None)
                self.bytes_sent += len(payload)
                return

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT, as a crash or a power cut would.

        The broker sees the TCP connection end and publishes the last will.  The run loop
        reconnects unless its task is cancelled right after (``fedmq simulate`` makes
        devices vanish mid-round this way).
        """
        client = self._client
        if client is None:
            return
        sock = client._client.socket()  # paho underneath: aiomqtt has no abort
        if isinstance(sock, socket.socket):  # TLS sockets too; paho's websocket wrapper not
            with contextlib.suppress(OSError):
                # shutdown, not close: the fd stays valid for the event loop's reader,
                # which then sees EOF instead of a reused descriptor.
                sock.shutdown(socket.SHUT_RDWR)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and after every reconnect.

        Returns once the SUBSCRIBE is on its way, without waiting for the broker's
        SUBACK (see :meth:`_send_control`).
        """
        self._subscriptions[topic_filter] = qos
        self._unsubscribing.discard(topic_filter)
        self._send_control(lambda client: client.subscribe(topic_filter, qos))

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter`` (now and after reconnects), without waiting.

        A persistent session keeps subscriptions across reconnects, so an unsubscribe
        the broker never acknowledged is sent again after the next reconnect.
        """
        self._subscriptions.pop(topic_filter, None)
        self._unsubscribing.add(topic_filter)
        self._send_unsubscribe(topic_filter)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        def done() -> None:
            self._unsubscribing.discard(topic_filter)

        self._send_control(lambda client: client.unsubscribe(topic_filter), on_ack=done)

    def _send_control(
        self,
        call: Callable[[aiomqtt.Client], Awaitable[Any]],
        on_ack: Callable[[], None] | None = None,
    ) -> None:
        # Message handlers (de)subscribe, e.g. when a blob completes.  Awaiting the ack
        # there would stall the receive loop for aiomqtt's whole timeout if the
        # connection dropped in between, because a stalled loop cannot notice the drop.
        # Order is kept (tasks start in creation order, and the packet leaves in the
        # task's first step); a lost (un)subscribe is redone by the resubscription after
        # the reconnect.
        client = self._client
        if client is None:
            return
        task = asyncio.create_task(self._await_ack(call(client), on_ack))
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    @staticmethod
    async def _await_ack(pending: Awaitable[Any], on_ack: Callable[[], None] | None) -> None:
        try:
            await pending
        except aiomqtt.MqttError:
            return
        if on_ack is not None:
            on_ack()
