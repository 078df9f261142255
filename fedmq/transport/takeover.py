"""Telling two clients that share one client id from a flaky network.

A broker hands a session to the newest connection with its client id.  Two devices
configured with the same id therefore knock each other off for ever; each reconnects at
once and neither says why.  :class:`TakeoverWatch` sees the pattern in how connections
end and stops the session with :class:`DuplicateClientIdError` (exit 78) instead.
"""

from __future__ import annotations

import logging

from fedmq.errors import ConfigError

log = logging.getLogger(__name__)


class DuplicateClientIdError(ConfigError):
    """Another connection keeps taking over our session: two clients share one id."""


# MQTT 5 DISCONNECT reason "Session taken over": another client connected with our id.
SESSION_TAKEN_OVER = 0x8E
TAKEOVER_LIMIT = 3  # takeovers within TAKEOVER_WINDOW before giving up: not a fluke
TAKEOVER_WINDOW = 120.0  # seconds
# Mosquitto 2.0 closes the older connection without saying why.  Two clients sharing an
# id then knock each other off every fraction of a second; a flaky network does not
# accept and drop a connection this often, this fast.
SHORT_LIVED = 5.0  # seconds a connection lasted
SHORT_LIVED_LIMIT = 8  # such connections within SHORT_LIVED_WINDOW
SHORT_LIVED_WINDOW = 60.0  # seconds

ADVICE = "Give every device its own client_id (and certificate)"


class TakeoverWatch:
    """Counts connections taken over or ended young; raises once it is not a fluke.

    Args:
        client_id: our client id (named in the error).
    """

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self._takeovers: list[float] = []  # loop times our session was taken over
        self._short_lived: list[float] = []  # loop times connections ended young

    def connection_ended(self, *, taken_over: bool, lasted: float | None, now: float) -> None:
        """A connection ended (``lasted``: seconds it was up; None: it never was).

        Raises:
            DuplicateClientIdError: MQTT 5 said "session taken over" ``TAKEOVER_LIMIT``
                times within ``TAKEOVER_WINDOW``, or (Mosquitto 2.0 says nothing)
                ``SHORT_LIVED_LIMIT`` connections ended within ``SHORT_LIVED`` seconds
                of being accepted, within ``SHORT_LIVED_WINDOW``.
        """
        client_id = self.client_id
        if taken_over:
            self._takeovers = [t for t in self._takeovers if now - t < TAKEOVER_WINDOW]
            self._takeovers.append(now)
            log.warning("another connection with client id %r took over our session", client_id)
            if len(self._takeovers) >= TAKEOVER_LIMIT:
                raise DuplicateClientIdError(
                    f"another client uses client id {client_id!r}: the broker handed our "
                    f"session to it {len(self._takeovers)} times in {TAKEOVER_WINDOW:.0f} s. "
                    + ADVICE
                )
            return
        if lasted is None or lasted >= SHORT_LIVED:
            return
        self._short_lived = [t for t in self._short_lived if now - t < SHORT_LIVED_WINDOW]
        self._short_lived.append(now)
        if len(self._short_lived) >= SHORT_LIVED_LIMIT:
            raise DuplicateClientIdError(
                f"the broker closed {len(self._short_lived)} connections within seconds of "
                f"accepting them in the last {SHORT_LIVED_WINDOW:.0f} s: another client most "
                f"likely uses client id {client_id!r} (a broker closes the older connection "
                "when a second one connects with the same id). " + ADVICE
            )
