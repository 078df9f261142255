"""Rehearsing on a broker the simulator does not start (``--broker mqtt(s)://HOST:PORT``).

A plant's broker (or a restrictive test listener) may carry a production federation, so
a simulation there keeps to itself:

- **Its own topic root**, ``fedmq-sim-<random>`` (or ``--topic-root``).  Before anything
  starts, a scan (:func:`check_unused`) refuses a root under which the federation's
  prefix already holds retained messages: a ``--topic-root`` that is in use.
- **Its own client ids**, under the same random name (``fedmq-sim-<random>-agent-000``,
  ``…-aggregator``), so it takes over no production device's session, nor another
  rehearsal's.  Every simulated client connects with the same credentials and TLS
  files; a broker that takes identities from client certificates (fedmq's production
  ACL: certificate CN = client id) would need one certificate per agent, so ``--broker``
  is meant for brokers that accept the simulator's clients (username and password, or
  a test listener).
- **Nothing left behind** (:func:`clean_up`, once every part has stopped): the retained
  announcement, blob chunks and statuses under its prefix are cleared with
  :func:`fedmq.transport.clearing.clear_federation` (verified by a second scan), then
  the persistent sessions its clients left on the broker are ended: each client id
  connects once more with a clean session, which the broker discards when it leaves.

:func:`use_external` does both for a run: the check before any part starts, the
clean-up when the run's exit stack unwinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from fedmq.errors import ConfigError, TransportError
from fedmq.simulate.brokers import BrokerPlan
from fedmq.transport.broker_config import BrokerSection
from fedmq.transport.clearing import ClearRefusedError, clear_federation, shown_names
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.transport.retained import SCAN_TIMEOUT
from fedmq.wire.topics import Topics

log = logging.getLogger(__name__)

RUN_PREFIX = "fedmq-sim"
CHECK_TIMEOUT = 15.0  # seconds: connect, subscribe and scan an (empty) prefix
CLEAN_TIMEOUT = 60.0  # seconds for clearing, verification scans included
SESSION_TIMEOUT = 10.0  # seconds for one client id to connect once more (ending its session)
SESSION_CONCURRENCY = 20  # clean-session connections at once: a plant broker is shared
SESSIONS_TIMEOUT = 120.0  # seconds for ending every session (a thousand agents)


def run_name() -> str:
    """``fedmq-sim-<8 hex digits>``: the default topic root and the client id prefix."""
    return f"{RUN_PREFIX}-{secrets.token_hex(4)}"


async def use_external(
    stack: contextlib.AsyncExitStack,
    section: BrokerSection,
    topics: Topics,
    *,
    name: str,
    session_clients: Sequence[str],
    on_cleaned: Callable[[Cleanup, str], None],
) -> BrokerPlan:
    """Check the run's prefix is free on the broker; clean it up when ``stack`` unwinds.

    Call it before any part starts: the clean-up, entered on ``stack`` first, then runs
    after all of them stopped (their offline statuses are retained by then), however
    the run ends.

    Args:
        stack: the run's exit stack.
        section: the external broker and the credentials of the run.
        topics: the run's federation topics (under its own root).
        name: the run's name (:func:`run_name`), the prefix of its client ids.
        session_clients: every client id the run will connect with a persistent session.
        on_cleaned: given what the clean-up did, and a line saying so.

    Raises:
        ConfigError: the prefix holds retained messages already.
        TransportError: the broker is unreachable or refuses us.
    """
    clear_client = f"{name}-clear"
    await check_unused(section, topics, clear_client)
    stack.push_async_callback(
        _clean_up_after, section, topics, clear_client, list(session_clients), on_cleaned
    )
    return BrokerPlan(
        "external",
        f"given with --broker; topic root {topics.root}, client ids {name}-…, cleared at the end",
    )


async def _clean_up_after(
    section: BrokerSection,
    topics: Topics,
    clear_client: str,
    session_clients: list[str],
    on_cleaned: Callable[[Cleanup, str], None],
) -> None:
    # A task of its own: after Ctrl-C the run's task is still "cancelling", and the MQTT
    # session re-raises the cancellation aiomqtt may swallow for any task that is
    # (aiomqtt_fixes.raise_if_cancelling), which would end the clean-up at its first publish.
    cleanup = await asyncio.create_task(
        clean_up(section, topics, clear_client=clear_client, session_clients=session_clients),
        name="fedmq-sim.clean-up",
    )
    on_cleaned(cleanup, cleanup.summary(topics.prefix) + f" on {section.url}")


async def check_unused(
    section: BrokerSection, topics: Topics, client_id: str, *, timeout: float = CHECK_TIMEOUT
) -> None:
    """Refuse a prefix that already holds retained messages on the broker.

    Raises:
        ConfigError: something is retained under ``<root>/<federation>/`` (a production
            federation, an earlier rehearsal that could not clean up), or its
            aggregator looks alive.
        TransportError: the broker is unreachable, refuses the credentials, or does
            not let this client subscribe and publish under the prefix.
    """
    settings = section.session_settings(client_id)
    try:
        report = await clear_federation(settings, topics, dry_run=True, timeout=timeout)
    except ClearRefusedError as exc:
        raise ConfigError(
            f"{exc} on {section.url}: choose another --topic-root (the default is unique)"
        ) from None
    except TransportError as exc:
        raise TransportError(f"the external broker {section.url}: {exc}") from exc
    found = report.found
    in_use = sorted({*found.clearable(), *found.foreign})
    if in_use:
        raise ConfigError(
            f"{topics.prefix}/ is in use on {section.url}: {len(in_use)} retained messages "
            f"(e.g. {shown_names(in_use)}); choose another --topic-root, or leave it out "
            "for a unique one"
        )


@dataclass
class Cleanup:
    """What :func:`clean_up` did on the external broker.

    Attributes:
        cleared: retained topics cleared.
        left: retained topics still there afterwards (republished, or refused by an ACL).
        sessions_ended: client ids whose persistent session was ended.
        sessions_failed: client ids whose session could not be ended (it expires by
            the broker's own rules: MQTT 5 session expiry, Mosquitto's
            ``persistent_client_expiration``).
        error: why clearing failed altogether (None: it ran).
    """

    cleared: int = 0
    left: list[str] = field(default_factory=list)
    sessions_ended: int = 0
    sessions_failed: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self, prefix: str) -> str:
        """One line for the console and the log."""
        if self.error is not None:
            text = f"could not clear {prefix}/: {self.error}"
        elif self.left:
            text = (
                f"cleared {self.cleared} retained messages under {prefix}/, but "
                f"{len(self.left)} are retained again: {shown_names(self.left)}"
            )
        else:
            text = f"cleared {self.cleared} retained messages under {prefix}/"
        text += f"; ended {self.sessions_ended} client sessions"
        if self.sessions_failed:
            text += f" ({len(self.sessions_failed)} could not be ended and will expire)"
        return text

    @property
    def complete(self) -> bool:
        """True when nothing retained and no session was left behind."""
        return self.error is None and not self.left and not self.sessions_failed


async def clean_up(
    section: BrokerSection,
    topics: Topics,
    *,
    clear_client: str,
    session_clients: Sequence[str],
) -> Cleanup:
    """Clear what the run retained under ``topics.prefix``, then end its clients' sessions.

    Call it once every part has stopped (their offline statuses are retained by then),
    and only on a prefix :func:`check_unused` found empty: it clears even a status that
    says the aggregator runs.  Never raises: a failure is reported in the result (the
    run's outcome matters more).

    Args:
        section: the broker and credentials the run used.
        topics: the run's federation topics.
        clear_client: client id for the scans and clears.
        session_clients: every client id the run connected with a persistent session.
    """
    result = Cleanup()
    settings = section.session_settings(clear_client)
    try:
        # Forced: check_unused found the prefix empty before the run, so all it holds is
        # this run's, and every part has stopped; an aggregator cancelled before it could
        # publish "offline" must not keep its retained status from being cleared.
        async with asyncio.timeout(CLEAN_TIMEOUT):
            report = await clear_federation(settings, topics, force=True, timeout=SCAN_TIMEOUT)
        result.cleared = len(report.cleared)
        live = [topics.status(client) for client in report.live_agents]  # still publishing
        result.left = sorted({*report.came_back, *live})
    except (TransportError, ConfigError, TimeoutError) as exc:
        result.error = str(exc) or type(exc).__name__
    result.sessions_failed = await end_sessions(section, session_clients)
    result.sessions_ended = len(session_clients) - len(result.sessions_failed)
    return result


async def end_sessions(
    section: BrokerSection,
    clients: Sequence[str],
    *,
    timeout: float = SESSION_TIMEOUT,
    concurrency: int = SESSION_CONCURRENCY,
) -> list[str]:
    """Connect as each of ``clients`` once with a clean session, then leave.

    A clean session replaces the persistent one the client left (its subscriptions and
    queued messages), and the broker discards it on disconnect (MQTT 5: session expiry
    0; 3.1.1: clean session).

    Returns:
        The client ids that could not connect in time.
    """
    limit = asyncio.Semaphore(concurrency)
    ended: set[str] = set()

    async def end(client: str) -> None:
        async with limit:
            try:
                await _connect_once(section, client, timeout)
            except (TransportError, ConfigError) as exc:
                log.warning("could not end the session of %s: %s", client, exc)
            else:
                ended.add(client)

    try:
        async with asyncio.timeout(SESSIONS_TIMEOUT), asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(end(client))
    except TimeoutError:
        log.warning("ending %d client sessions took over %g s", len(clients), SESSIONS_TIMEOUT)
    return sorted(set(clients) - ended)


async def _ignore(_message: Message) -> None:
    return None  # a clean session subscribes to nothing: no message can arrive


async def _connect_once(section: BrokerSection, client: str, timeout: float) -> None:
    settings = dataclasses.replace(section.session_settings(client), persistent_session=False)
    session = MqttSession(settings)
    task = asyncio.create_task(session.run(_ignore), name=f"fedmq-sim.end-session[{client}]")
    try:
        await _first_of(session.wait_connected(timeout), task)
    finally:
        task.cancel()  # a clean DISCONNECT; the broker drops the session either way
        await asyncio.gather(task, return_exceptions=True)


async def _first_of(waiting: Awaitable[None], task: asyncio.Task[None]) -> None:
    """Await ``waiting`` unless the session ``task`` ends first (e.g. bad TLS files)."""
    waiter = asyncio.ensure_future(waiting)
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if waiter.done():
        waiter.result()  # TransportError: no connection in time
        return
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    task.result()  # what stopped the session
    raise TransportError(f"the session as {task.get_name()} ended before connecting")
