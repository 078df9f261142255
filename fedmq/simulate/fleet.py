"""The simulated devices: in-process agents on an event loop of their own, or subprocesses.

Both fleets run the real agent (:class:`edge_agent.daemon.Agent`): its own MQTT
session, state directory, outbox and onnxruntime sessions per device.  They can make a
device vanish mid-round without a goodbye, so the broker fires its last will:

- in-process: :meth:`Agent.abort` drops the TCP connection without a DISCONNECT, then
  its task is cancelled;
- subprocess: ``kill -9``.

A vanished device can come back later (:meth:`revive`), like a rebooted one, with the
same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edge_agent.config import AgentSettings
from edge_agent.daemon import TRAIN_THREAD_PREFIX, Agent, AgentStatistics
from edge_agent.training import RoundOutput
from fedmq.broker.process import die_with_parent
from fedmq.errors import SimulationError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEVICE_LOOP_THREAD = "fedmq-sim-devices"
CONNECT_WAVE = 100  # agents connecting at once: a 1000-device storm starves the event loop
WAVE_TIMEOUT = 60.0  # seconds for one wave to connect
STOP_TIMEOUT = 15.0  # seconds for agents to stop after request_stop/SIGTERM (they take <10)
POLL_INTERVAL = 0.05  # seconds between checks while waiting
CANCEL_RETRY = 1.0  # seconds before cancelling a task again that has not finished
MAX_TRAIN_WORKERS = 8  # threads training in-process agents: onnxruntime runs one core each
LOG_TAIL_LINES = 8
_PR_SET_PDEATHSIG = 1  # prctl(2): signal the child when the parent thread exits


class Fleet(Protocol):
    """What the simulation does with its devices."""

    @property
    def clients(self) -> Sequence[str]:
        """Every device's client id."""
        ...

    async def start(self) -> None:
        """Start every device."""
        ...

    def is_alive(self, client: str) -> bool:
        """True unless ``client`` was crashed and not revived."""
        ...

    def crash(self, client: str) -> None:
        """Make ``client`` vanish at once, without a clean disconnect."""
        ...

    async def revive(self, client: str) -> None:
        """Start ``client`` again with its state directory (a reboot)."""
        ...

    def failures(self) -> list[str]:
        """Devices that stopped by themselves, with the reason (empty: all well)."""
        ...

    async def stop(self) -> None:
        """Stop every device cleanly (bounded; stragglers are killed)."""
        ...


class TrainingPool:
    """A bounded pool of worker threads that run in-process agents' rounds.

    Each agent on a device trains on a thread of its own.  A thousand agents in one
    process would start a thousand threads per round: profiled, the event loop then
    spent a sixth of its time in ``Thread.start`` waiting for new threads to get the
    GIL, and the threads only contend for two cores anyway.  A few long-lived workers
    run the same work in order instead.

    Args:
        workers: threads (default: two per core, at most ``MAX_TRAIN_WORKERS``).
    """

    def __init__(self, workers: int | None = None) -> None:
        count = workers or min(MAX_TRAIN_WORKERS, 2 * (os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(count, thread_name_prefix=TRAIN_THREAD_PREFIX)

    async def __call__(self, function: Callable[[], RoundOutput], name: str) -> RoundOutput:
        """Run ``function`` on a worker (``name`` only labels it in logs)."""
        log.debug("queueing %s", name)
        return await asyncio.get_running_loop().run_in_executor(self._pool, function)

    def close(self) -> None:
        """Drop queued work and let the workers finish (agents set their cancel flags)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Member:
    agent: Agent
    task: asyncio.Task[None]
    crashed: bool = False


class InProcessFleet:
    """In-process agents, each a full :class:`Agent`, sharing one event loop of their own.

    The devices' loop runs on a thread beside the caller's (the aggregator's): every
    MQTT session reads one packet per readable event and each message costs a task step,
    so an aggregator sharing a loop with a thousand agents would handle one message per
    pass over all of theirs (profiled: updates trained 9 s into a 1000-agent round were
    acked 5 s later).  With its own loop it keeps a server's pace.  The methods are
    called from the caller's loop and run on the devices' loop.

    Args:
        settings: one per device.
    """

    def __init__(self, settings: Sequence[AgentSettings]) -> None:
        self._settings = {s.client_id: s for s in settings}
        self._members: dict[str, _Member] = {}
        self._errors: dict[str, str] = {}
        self._pool = TrainingPool()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def clients(self) -> Sequence[str]:
        """Every device's client id, in order."""
        return list(self._settings)

    def agent(self, client: str) -> Agent:
        """The running agent object of ``client``."""
        return self._members[client].agent

    def statistics(self) -> dict[str, AgentStatistics]:
        """Counters of every current agent object."""
        return {client: m.agent.statistics() for client, m in list(self._members.items())}

    async def _on_devices(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the devices' loop and wait for it here."""
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise SimulationError("the agents' event loop is not running")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))

    # -- on the devices' loop ---------------------------------------------------------

    def _launch(self, client: str) -> None:
        agent = Agent(self._settings[client], train_runner=self._pool)
        task = asyncio.create_task(self._run(client, agent), name=f"fedmq-sim[{client}]")
        self._members[client] = _Member(agent, task)

    async def _run(self, client: str, agent: Agent) -> None:
        try:
            await agent.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # An agent failing by itself is a finding, not something to hide.
            log.exception("agent %s failed", client)
            self._errors[client] = f"{type(exc).__name__}: {exc}"

    async def _start_all(self) -> None:
        clients = list(self._settings)
        for begin in range(0, len(clients), CONNECT_WAVE):
            wave = clients[begin : begin + CONNECT_WAVE]
            for client in wave:
                self._launch(client)
            await self._wait_connected(wave)

    async def _wait_connected(self, wave: Sequence[str]) -> None:
        deadline = time.monotonic() + WAVE_TIMEOUT
        while True:
            pending = [c for c in wave if not self._members[c].agent.connected]
            failed = [c for c in wave if c in self._errors]
            if failed:
                raise SimulationError(
                    f"agent {failed[0]} failed to start: {self._errors[failed[0]]}"
                )
            if not pending:
                return
            if time.monotonic() > deadline:
                raise SimulationError(
                    f"{len(pending)} agents (e.g. {pending[0]}) did not connect within "
                    f"{WAVE_TIMEOUT:g} s"
                )
            await asyncio.sleep(POLL_INTERVAL)

    def _crash_now(self, member: _Member) -> None:
        member.agent.abort()
        member.task.cancel()

    async def _revive(self, client: str) -> None:
        await _cancel_and_wait(self._members[client].task)
        self._launch(client)

    async def _stop_all(self) -> None:
        members = list(self._members.values())
        for member in members:
            if not member.crashed:
                member.agent.request_stop()
        tasks = [m.task for m in members]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            if pending:
                log.warning(
                    "%d agents did not stop within %g s; cancelled", len(pending), STOP_TIMEOUT
                )
                await asyncio.gather(*(_cancel_and_wait(task) for task in pending))

    # -- called from the caller's loop ------------------------------------------------

    async def start(self) -> None:
        """Start the devices' loop, then every agent, ``CONNECT_WAVE`` at a time.

        Raises:
            SimulationError: an agent failed, or a wave did not connect within
                ``WAVE_TIMEOUT``.
        """
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=DEVICE_LOOP_THREAD, daemon=True
        )
        self._thread.start()
        await self._on_devices(self._start_all())

    def is_alive(self, client: str) -> bool:
        """True unless crashed and not revived."""
        member = self._members.get(client)
        return member is not None and not member.crashed

    def crash(self, client: str) -> None:
        """Drop the agent's connection without DISCONNECT and cancel it (at once)."""
        member = self._members[client]
        if member.crashed or self._loop is None:
            return
        member.crashed = True
        self._loop.call_soon_threadsafe(self._crash_now, member)

    async def revive(self, client: str) -> None:
        """Wait for the crashed agent's task to end, then start a new one on its state."""
        member = self._members[client]
        if member.crashed:
            await self._on_devices(self._revive(client))

    def failures(self) -> list[str]:
        """Agents whose run ended with an error."""
        return [f"{client}: {error}" for client, error in sorted(self._errors.items())]

    async def stop(self) -> None:
        """Stop every agent cleanly (offline status, DISCONNECT), then the devices' loop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            await self._on_devices(self._stop_all())
        finally:
            self._pool.close()
            self._loop = None
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, STOP_TIMEOUT)
            if not thread.is_alive():
                loop.close()


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it ends.

    Once is enough unless a library swallowed the cancellation (``asyncio.wait_for`` on
    Python 3.11 does when the awaited operation completes at the same moment); asking
    again is harmless, and a simulation must never hang on one device.
    """
    attempts = 0
    while not task.done():
        task.cancel()
        attempts += 1
        await asyncio.wait({task}, timeout=CANCEL_RETRY)
    if attempts > 1:
        log.warning("%s needed %d cancellations to stop", task.get_name(), attempts)


@dataclass
class _Process:
    config: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    crashed: bool = False


class ProcessFleet:
    """``fedmq-agent run`` subprocesses, one per device.

    Args:
        configs: ``agent.toml`` path per client id.
        log_dir: where each agent's stderr goes (``<client>.log``).
        env: variables every agent gets on top of ours (e.g. the broker password,
            kept out of the ``agent.toml`` files).
    """

    def __init__(
        self, configs: dict[str, Path], log_dir: Path, *, env: dict[str, str] | None = None
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs = {
            client: _Process(config, log_dir / f"{client}.log")
            for client, config in configs.items()
        }
        self._preexec = die_with_parent()
        self._env = dict(env or {})

    @property
    def clients(self) -> Sequence[str]:
        """Every device's client id, in order."""
        return list(self._procs)

    def pid(self, client: str) -> int | None:
        """Process id of a running agent."""
        popen = self._procs[client].popen
        return popen.pid if popen is not None and popen.poll() is None else None

    def pids(self) -> list[int]:
        """Process ids of every agent process started and not yet reaped."""
        return [p.popen.pid for p in self._procs.values() if p.popen is not None]

    def _spawn(self, client: str) -> None:
        proc = self._procs[client]
        # The agent reads FEDMQ_AGENT_* and systemd's NOTIFY_SOCKET: ours are not its.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMQ_", "NOTIFY_"))}
        env.update(self._env)
        command = [sys.executable, "-m", "edge_agent", "run", "--config", str(proc.config)]
        with open(proc.log, "ab") as sink:
            proc.popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                env=env,
                # Our terminal's Ctrl-C is ours to handle: we stop the agents ourselves.
                start_new_session=True,
                preexec_fn=self._preexec,  # noqa: PLW1509 - only a prctl system call
            )
        proc.crashed = False

    async def start(self) -> None:
        """Start every agent process (their broker connections are awaited elsewhere)."""
        for client in self._procs:
            self._spawn(client)

    def is_alive(self, client: str) -> bool:
        """True unless crashed and not revived."""
        proc = self._procs[client]
        return proc.popen is not None and not proc.crashed

    def crash(self, client: str) -> None:
        """``kill -9`` the agent."""
        proc = self._procs[client]
        if proc.popen is None or proc.crashed:
            return
        proc.crashed = True
        with contextlib.suppress(ProcessLookupError):
            proc.popen.kill()

    async def revive(self, client: str) -> None:
        """Reap the killed process and start a new one with the same configuration."""
        proc = self._procs[client]
        if proc.popen is not None:
            await asyncio.to_thread(proc.popen.wait)
        self._spawn(client)

    def failures(self) -> list[str]:
        """Agents that exited by themselves, with their exit code and last log lines."""
        problems = []
        for client, proc in self._procs.items():
            if proc.popen is None or proc.crashed:
                continue
            code = proc.popen.poll()
            if code is not None:
                problems.append(f"{client} exited with {code}: {_tail(proc.log)}")
        return problems

    async def stop(self) -> None:
        """SIGTERM every agent, wait ``STOP_TIMEOUT``, SIGKILL the rest, reap all."""
        running = [p.popen for p in self._procs.values() if p.popen is not None]
        for popen in running:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL)
        for popen in running:
            if popen.poll() is None:
                log.warning("agent process %d ignored SIGTERM; killing it", popen.pid)
                popen.kill()
            popen.wait()


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"
