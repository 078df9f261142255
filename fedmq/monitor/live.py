"""The MQTT side of ``fedmq monitor``: subscribe to the control topics, feed the state.

The monitor subscribes to ``round``, ``status/+`` and ``aggregator/status`` of one
federation, on a clean session (a monitor leaves nothing queued on the broker), and
never to blobs, updates or acks: the read-only monitor identity of
``broker_config/README.md`` may read exactly these topics and write nothing.

**One snapshot** (:func:`collect`, ``--once``).  MQTT has no "end of retained
messages", and ``fedmq clear``'s trick (publish a marker and wait for it to come
back) needs a write the monitor identity does not have.  So :func:`collect` waits until
the retained round announcement and aggregator status have both arrived and then no
further *retained* message for ``settle_s`` (default 0.3 s): a broker sends a new
subscription's retained messages in one burst right after the SUBACK, so a pause means
the burst is over.  Live messages (heartbeats, which carry no retain flag) are folded
in but do not extend the wait, so a busy federation settles as fast as an idle one.
The whole wait is bounded by ``timeout``; a federation without a retained aggregator
status (never started, or cleared) ends there, incomplete.

**Live** (:func:`watch`): fold every message and redraw on every change, and at least
every ``refresh_s`` (the deadline countdown and "last seen" move on their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from fedmq.errors import TransportError
from fedmq.monitor.state import MonitorState
from fedmq.monitor.view import render
from fedmq.timeouts import wait_event
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message, MessageHandler
from fedmq.transport.mqtt import MqttSession

SETTLE_S = 0.3  # seconds without a retained message after which the burst is over
TIMEOUT_S = 10.0  # seconds to connect and receive the retained round and aggregator status
REFRESH_S = 1.0  # seconds between redraws of the live view when nothing arrives

Clock = Callable[[], float]


def monitor_session(
    settings: BrokerSettings, state: MonitorState, on_message: Callable[[Message], None]
) -> tuple[MqttSession, MessageHandler]:
    """A clean session subscribed to the control topics, and its message handler."""
    settings = dataclasses.replace(settings, persistent_session=False)
    session = MqttSession(settings, subscriptions=[(f, 1) for f in state.topic_filters()])

    async def handle(message: Message) -> None:
        on_message(message)

    return session, handle


async def _connected(session: MqttSession, task: asyncio.Task[None], timeout: float) -> None:
    """Wait for the connection (subscriptions made), or for the session task to fail."""
    connected = asyncio.create_task(session.wait_connected(timeout))
    await asyncio.wait([connected, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():  # the session loop itself failed (e.g. bad TLS settings)
        connected.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connected
        task.result()
        raise TransportError(f"the session to {session.settings.url} ended before connecting")
    connected.result()


async def collect(
    settings: BrokerSettings,
    state: MonitorState,
    *,
    settle_s: float = SETTLE_S,
    timeout: float = TIMEOUT_S,
    clock: Clock = time.time,
) -> bool:
    """Fold the federation's retained control messages into ``state``.

    Returns True once the retained round and aggregator status arrived and no retained
    message followed for ``settle_s``; False when ``timeout`` ran out first (what
    arrived is in ``state`` all the same).

    Raises:
        TransportError: no connection within ``timeout``.
        ConfigError: the TLS files cannot be loaded.
    """
    settings.tls_context()  # unreadable TLS files: ConfigError before connecting
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()
    last_retained = loop.time()

    def on_message(message: Message) -> None:
        nonlocal last_retained
        state.fold(message.topic, message.payload, clock(), retained=message.retain)
        if message.retain:
            last_retained = loop.time()
        arrived.set()

    session, handle = monitor_session(settings, state, on_message)
    deadline = loop.time() + timeout
    task = asyncio.create_task(session.run(handle), name=f"monitor[{settings.client_id}]")
    try:
        await _connected(session, task, timeout)
        last_retained = max(last_retained, loop.time())
        while True:
            now = loop.time()
            if now >= deadline:
                return False
            wait = deadline - now
            if state.baseline:
                quiet = last_retained + settle_s - now
                if quiet <= 0:
                    return True
                wait = min(wait, quiet)
            arrived.clear()
            await wait_event(arrived, wait)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def watch(
    settings: BrokerSettings,
    state: MonitorState,
    console: Console,
    *,
    refresh_s: float = REFRESH_S,
    clock: Clock = time.time,
    stop: asyncio.Event | None = None,
) -> None:
    """Draw the live view on ``console`` until cancelled (or ``stop`` is set).

    Raises:
        ConfigError: the TLS files cannot be loaded.
    """
    settings.tls_context()
    changed = asyncio.Event()

    def on_message(message: Message) -> None:
        if state.fold(message.topic, message.payload, clock(), retained=message.retain):
            changed.set()

    session, handle = monitor_session(settings, state, on_message)

    def view() -> Group:
        parts: list[RenderableType] = []
        if not session.is_connected:
            error = f" ({session.last_error})" if session.last_error else ""
            parts.append(Text(f"connecting to {settings.url}…{error}", "yellow"))
        parts.append(render(state.snapshot(clock())))
        return Group(*parts)

    task = asyncio.create_task(session.run(handle), name=f"monitor[{settings.client_id}]")
    try:
        with Live(view(), console=console, auto_refresh=False, transient=False) as live:
            while stop is None or not stop.is_set():
                if task.done():
                    task.result()  # the session loop failed: say why
                await wait_event(changed, refresh_s)
                changed.clear()
                live.update(view(), refresh=True)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
