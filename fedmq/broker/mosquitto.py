"""Start and stop a private Mosquitto broker for tests, benchmarks and ``fedmq simulate``.

The broker runs from a config rendered out of ``broker_config/mosquitto/dev.conf.template``
on a free loopback port, with its own state directory, so it never touches a system broker
(which may already hold port 1883).

:class:`ProductionMosquittoConfig` renders ``production.conf.template`` instead (mutual
TLS, ACL, CRL): ``fedmq pki broker-config`` writes it for an operator, and tests start
it exactly like the development broker to check what the plant's broker enforces.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import signal
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
# Mosquitto parses max_queued_bytes with atoi() into an int: a larger value wraps (2 GiB
# becomes negative, which Mosquitto turns into 0 = unlimited; 5 GB becomes ~700 MB).  So
# the dev default above is, in effect, unlimited; the dev broker keeps it that way.
MAX_QUEUED_BYTES_LIMIT = 2**31 - 1
PRODUCTION_MAX_QUEUED_BYTES = 1024**3  # bytes per client: 2 x 125 agents x 4 MB updates
PRODUCTION_MAX_INFLIGHT = 20  # Mosquitto's default; the queue takes the rest of a burst
PRODUCTION_AUTOSAVE = 30  # seconds: what a broker crash can lose of the retained state
PRODUCTION_CLIENT_EXPIRATION = "7d"  # a week-long outage keeps the aggregator's session
PACKET_HEADROOM = 1024  # bytes of MQTT and fedmq headers around a chunk
_EXPIRATION = re.compile(r"[1-9][0-9]*[hdwmy]")

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

    scheme = "mqtt"

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
            user=_current_user(),
        )
        if self.extra_lines:
            text += "\n" + "\n".join(self.extra_lines) + "\n"
        return text


def _current_user() -> str:
    # Started as root, Mosquitto switches to this user; the state directory is ours.
    return pwd.getpwuid(os.getuid()).pw_name


def queue_limits(
    agents: int, update_bytes: int, chunk_size: int, rounds_of_outage: int = 1
) -> tuple[int, int]:
    """``(max_queued_messages, max_queued_bytes)`` by the rule of broker_config/README.md.

    The message count is never below the development default: the bytes bound the queue.

    Raises:
        ConfigError: a non-positive input, or more bytes than Mosquitto can be told.
    """
    if min(agents, update_bytes, chunk_size, rounds_of_outage) < 1:
        raise ConfigError("agents, update size, chunk size and rounds must all be positive")
    chunks = math.ceil(update_bytes / chunk_size)
    messages = 2 * agents * chunks * rounds_of_outage
    queued_bytes = 2 * agents * update_bytes * rounds_of_outage
    if queued_bytes > MAX_QUEUED_BYTES_LIMIT:
        raise ConfigError(
            f"the queue rule asks for max_queued_bytes {queued_bytes}, over the "
            f"{MAX_QUEUED_BYTES_LIMIT} Mosquitto can parse; use max_queued_bytes 0 "
            "(unlimited) and bound the broker with memory_limit instead"
        )
    return max(messages, DEFAULT_MAX_QUEUED_MESSAGES), queued_bytes


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a TLS listener that requires client certificates."""

    cafile: Path  # the CA client certificates must be signed by
    certfile: Path  # the broker's own certificate
    keyfile: Path  # and its private key
    crlfile: Path  # revoked client certificates


@dataclass(kw_only=True)
class ProductionMosquittoConfig:
    """Settings rendered into ``production.conf.template``: mTLS, ACL, CRL, sized queues.

    Defaults suit a test broker on a loopback port that keeps everything in its state
    directory; an operator's rendering sets ``port=8883``, ``bind_address=""`` (every
    interface), ``user="mosquitto"`` and the system's persistence and log locations.
    """

    tls: TlsFiles
    acl_file: Path
    port: int = 0  # 0 = pick a free port at start
    bind_address: str = "127.0.0.1"  # "" = every interface
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_queued_bytes: int = PRODUCTION_MAX_QUEUED_BYTES
    max_inflight_messages: int = PRODUCTION_MAX_INFLIGHT
    persistence: bool = True
    autosave_interval: int = PRODUCTION_AUTOSAVE
    persistent_client_expiration: str = PRODUCTION_CLIENT_EXPIRATION
    user: str | None = None  # None: whoever starts the broker
    persistence_location: Path | None = None  # None: the state directory
    log_file: Path | None = None  # None: mosquitto.log in the state directory
    extra_lines: list[str] = field(default_factory=list)

    scheme = "mqtts"

    def render(self, state_dir: Path) -> str:
        """Return the config file text; ``state_dir`` holds what is not set explicitly.

        Raises:
            ConfigError: a value Mosquitto would misread or reject.
        """
        if not 0 <= self.max_queued_bytes <= MAX_QUEUED_BYTES_LIMIT:
            raise ConfigError(
                f"max_queued_bytes {self.max_queued_bytes}: Mosquitto reads it as a C int, "
                f"so 0 (unlimited) to {MAX_QUEUED_BYTES_LIMIT}"
            )
        if not _EXPIRATION.fullmatch(self.persistent_client_expiration):
            raise ConfigError(
                f"persistent_client_expiration {self.persistent_client_expiration!r} must "
                "be a number followed by h, d, w, m or y (e.g. 7d)"
            )
        values = {
            "user": self.user or _current_user(),
            "acl_file": self.acl_file,
            "port": self.port,
            "bind_address": self.bind_address,
            "cafile": self.tls.cafile,
            "certfile": self.tls.certfile,
            "keyfile": self.tls.keyfile,
            "crlfile": self.tls.crlfile,
            "max_packet_size": self.max_packet_size,
            "max_queued_messages": self.max_queued_messages,
            "max_queued_bytes": self.max_queued_bytes,
            "max_inflight_messages": self.max_inflight_messages,
            "persistence": "true" if self.persistence else "false",
            "persistence_location": str(self.persistence_location or state_dir).rstrip("/"),
            "autosave_interval": self.autosave_interval,
            "persistent_client_expiration": self.persistent_client_expiration,
            "log_file": self.log_file or state_dir / "mosquitto.log",
        }
        for name, value in values.items():
            if "\n" in str(value):
                raise ConfigError(f"{name} {str(value)!r} must not contain a line break")
        text = string.Template(template_text("production.conf.template")).substitute(values)
        # "listener 8883 " with no address listens everywhere; drop the trailing blank.
        text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
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
        self,
        config: MosquittoConfig | ProductionMosquittoConfig | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.config: MosquittoConfig | ProductionMosquittoConfig = config or MosquittoConfig()
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

    @property
    def url(self) -> str:
        """``mqtt://host:port``, or ``mqtts://host:port`` for the production config."""
        return f"{self.config.scheme}://{self.host}:{self.port}"

    def reload(self) -> None:
        """Send SIGHUP: Mosquitto re-reads its ACL file, certificates and CRL.

        It handles the signal in its main loop, shortly after this returns; clients
        already connected keep their connection (a revoked one until it reconnects).
        """
        if self._process is None or not self.is_running():
            raise TransportError("mosquitto is not running")
        self._process.send_signal(signal.SIGHUP)

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
