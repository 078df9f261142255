"""Start and stop a private Mosquitto broker for tests, benchmarks and ``fedmq simulate``.

The broker runs from a config rendered out of ``broker_config/mosquitto/dev.conf.template``
on a free loopback port, with its own state directory, so it never touches a system broker
(which may already hold port 1883).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedmq.errors import ConfigError, TransportError

START_TIMEOUT = 10.0  # seconds: mosquitto binds within ~50 ms; slow CI disks need margin
STOP_TIMEOUT = 5.0  # seconds: SIGTERM lets it write its persistence file first
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024  # bytes: one 256 KiB chunk plus headers, with headroom
DEFAULT_MAX_QUEUED_MESSAGES = 100_000  # see the template: bursts of update chunks
DEFAULT_MAX_QUEUED_BYTES = 2 * 1024**3  # bytes: bound the queue by memory, not by count

_SEARCH_DIRS = (
    "/usr/sbin",
    "/usr/local/sbin",
    "/opt/homebrew/sbin",
    "/usr/local/opt/mosquitto/sbin",
)


def find_mosquitto() -> str | None:
    """Return the path of the ``mosquitto`` executable, or None when it is not installed.

    Debian installs it in ``/usr/sbin``, which is not on an ordinary user's PATH.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def template_text(name: str = "dev.conf.template") -> str:
    """Return the text of a Mosquitto config template shipped in ``broker_config/mosquitto``."""
    candidates = (
        Path(__file__).resolve().parents[2] / "broker_config" / "mosquitto" / name,  # checkout
        Path(sys.prefix) / "share" / "fedmq" / "broker_config" / "mosquitto" / name,  # wheel
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise ConfigError(f"mosquitto config template {name!r} not found in the fedmq installation")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class MosquittoConfig:
    """Settings rendered into the development broker's config file."""

    port: int = 0  # 0 = pick a free port at start
    bind_address: str = "127.0.0.1"
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_inflight_messages: int = 0
    persistence: bool = False
    extra_lines: list[str] = field(default_factory=list)

    def render(self, state_dir: Path) -> str:
        """Return the config file text for a broker keeping its files in ``state_dir``."""
        text = string.Template(template_text()).substitute(
            port=self.port,
            bind_address=self.bind_address,
            max_packet_size=self.max_packet_size,
            max_queued_messages=self.max_queued_messages,
            max_queued_bytes=self.max_queued_bytes,
            max_inflight_messages=self.max_inflight_messages,
            persistence="true" if self.persistence else "false",
            state_dir=str(state_dir),
            user=pwd.getpwuid(os.getuid()).pw_name,
        )
        if self.extra_lines:
            text += "\n" + "\n".join(self.extra_lines) + "\n"
        return text


class MosquittoBroker:
    """A Mosquitto process on a private port; use as a context manager or call start/stop.

    ``restart()`` keeps the port and, with ``persistence=True``, the retained messages
    and persistent sessions, which is what a plant broker's reboot looks like to clients.
    """

    def __init__(
        self, config: MosquittoConfig | None = None, state_dir: Path | None = None
    ) -> None:
        self.config = config or MosquittoConfig()
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="fedmq-mosquitto-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.executable = find_mosquitto()

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return self.config.bind_address

    @property
    def port(self) -> int:
        """TCP port of the listener (valid after ``start``)."""
        return self.config.port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` URL of the broker."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """File the broker logs to."""
        return self.state_dir / "mosquitto.log"

    def is_running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the broker and wait until it accepts TCP connections."""
        if self.executable is None:
            raise TransportError(
                "mosquitto is not installed: install it (Debian/Ubuntu: apt-get install mosquitto)"
            )
        if self.is_running():
            return
        pick_port = self.config.port == 0
        for _attempt in range(5):
            if pick_port:
                self.config.port = free_port(self.config.bind_address)
            conf_path = self.state_dir / "mosquitto.conf"
            conf_path.write_text(self.config.render(self.state_dir), encoding="utf-8")
            self._process = subprocess.Popen(
                [self.executable, "-c", str(conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in a terminal is ours to forward
            )
            if self._wait_ready():
                return
            # Lost the race for the port, or the config is bad: report the latter.
            self._reap()
            if not pick_port:
                break
        raise TransportError(
            f"mosquitto did not start on {self.host}:{self.config.port}; "
            f"see {self.log_path}: {self._log_tail()}"
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.config.port), timeout=0.2),
            ):
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        text = ""
        if self.log_path.exists():
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return " | ".join(text.strip().splitlines()[-5:]) or "(no log output)"

    def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()
        self._process = None

    def stop(self) -> None:
        """Stop the broker (SIGTERM, so it saves persistence) and wait for it to exit."""
        self._reap()

    def kill(self) -> None:
        """Kill the broker without letting it save anything (a crash)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._reap()

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and delete its state directory if this object created it."""
        self.stop()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
