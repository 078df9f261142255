"""Start and stop a private Mosquitto broker for tests, benchmarks and ``fedmq simulate``.

The broker runs from a config rendered out of ``broker_config/mosquitto/dev.conf.template``
on a free loopback port, with its own state directory, so it never touches a system broker
(which may already hold port 1883).
"""

from __future__ import annotations

import os
import pwd
import shutil
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.broker.process import START_TIMEOUT, BrokerProcess, free_port
from fedmq.errors import ConfigError, TransportError

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


class MosquittoBroker(BrokerProcess):
    """A Mosquitto process on a private port; use as a context manager or call start/stop.

    ``restart()`` keeps the port and, with ``persistence=True``, the retained messages
    and persistent sessions, which is what a plant broker's reboot looks like to clients.
    """

    name = "mosquitto"
    protocol = "5"

    def __init__(
        self, config: MosquittoConfig | None = None, state_dir: Path | None = None
    ) -> None:
        self.config = config or MosquittoConfig()
        self._own_state_dir = state_dir is None
        super().__init__(
            self.config.bind_address,
            Path(state_dir or tempfile.mkdtemp(prefix="fedmq-mosquitto-")),
        )
        self.executable = find_mosquitto()

    @property
    def port(self) -> int:
        """TCP port of the listener (valid after ``start``)."""
        return self.config.port

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
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in a terminal is ours to forward
                # One prctl call, set only by the simulator, which starts brokers first.
                preexec_fn=self.preexec,  # noqa: PLW1509
            )
            if self._wait_ready(START_TIMEOUT):
                return
            # Lost the race for the port, or the config is bad: report the latter.
            self.stop()
            if not pick_port:
                break
        raise TransportError(
            f"mosquitto did not start on {self.host}:{self.config.port}; "
            f"see {self.log_path}: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        text = ""
        if self.log_path.exists():
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return " | ".join(text.strip().splitlines()[-5:]) or "(no log output)"

    def close(self) -> None:
        """Stop the broker and delete its state directory if this object created it."""
        self.stop()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
