"""systemd ``Type=notify`` support: READY=1, WATCHDOG=1, STOPPING=1, STATUS=….

Both services run under systemd (``deploy/fedmq-agent.service``,
``deploy/fedmq-aggregator.service``), so this helper sits at the bottom beside the
errors: ``edge_agent`` and ``fedmq.aggregator`` both use it and neither may import the
other.  It needs nothing but the standard library.

The protocol (sd_notify(3)) is one datagram of ``KEY=VALUE`` lines to the unix socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).  It is a
dozen lines, so they live here rather than in a dependency: the ``sdnotify`` package
has had no release since 2017, carries no type information, and does not read the
watchdog interval (``$WATCHDOG_USEC``/``$WATCHDOG_PID``), which the services need.

Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a silent no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state notifications to systemd's service manager, if there is one.

    Args:
        environ: the environment to read (``os.environ`` by default; tests pass their own).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()  # abstract namespace socket
        elif address.startswith("/"):
            self._address = address
        self._watchdog_usec = _watchdog_usec(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when a notification socket was given."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of ``WatchdogSec=``), or None if unset."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; return True if sent.

        A send failure is logged once (a broken socket must not take the service down).
        """
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at $NOTIFY_SOCKET: %s", exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell systemd the service is up (``Type=notify`` start completes)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """Ping the watchdog (``WatchdogSec=``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """Tell systemd the service is shutting down."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process the watchdog is meant for; a child that inherited
    # the environment must not ping on its parent's behalf.
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    return usec if usec > 0 else None
