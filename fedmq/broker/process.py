"""What the brokers fedmq starts have in common: a child process on a loopback port."""

from __future__ import annotations

import abc
import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

START_TIMEOUT = 10.0  # seconds: mosquitto binds within ~50 ms; slow CI disks need margin
STOP_TIMEOUT = 5.0  # seconds: SIGTERM lets a broker write its persistence file first
PROBE_INTERVAL = 0.02  # seconds between readiness probes


_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when we die (Linux only; else None).

    Without it, a simulator killed with ``kill -9`` would leave its broker and agents
    running.  The libc function is looked up here, in the parent, so the child only
    makes the system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return preexec


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class BrokerProcess(abc.ABC):
    """A broker running as a child process; subclasses say how to launch it.

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    name = "broker"
    protocol: Literal["5", "3.1.1"] = "5"  # the MQTT version clients should speak

    def __init__(self, host: str, state_dir: Path) -> None:
        self._host = host
        self.state_dir = state_dir
        self._process: subprocess.Popen[bytes] | None = None
        # Set to die_with_parent() when nothing else would stop the broker if we crash.
        self.preexec: Callable[[], None] | None = None

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return self._host

    @property
    @abc.abstractmethod
    def port(self) -> int:
        """TCP port of the listener (valid after ``start``)."""

    @property
    def url(self) -> str:
        """``mqtt://host:port`` URL of the broker."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """File the broker logs to."""
        return self.state_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Process id while running (tests freeze brokers with SIGSTOP)."""
        return self._process.pid if self.is_running() and self._process else None

    def is_running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @abc.abstractmethod
    def start(self) -> None:
        """Start the broker and wait until it accepts TCP connections."""

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return True
            time.sleep(PROBE_INTERVAL)
        return False

    def stop(self) -> None:
        """Stop the broker (SIGTERM, so it can save state) and wait for it to exit."""
        process = self._process
        self._process = None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def kill(self) -> None:
        """Kill the broker without letting it save anything (a crash)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and release what it holds."""
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
