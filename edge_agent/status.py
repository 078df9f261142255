"""What the agent is doing, as the retained ``AgentStatus`` JSON on ``…/status/<client>``.

The board is plain mutable state updated by the daemon and the training thread (single
attribute writes, which the GIL makes atomic); :meth:`StatusBoard.snapshot` freezes it
into a message whenever a heartbeat or a state change publishes it.
"""

from __future__ import annotations

import platform

import fedmq
from fedmq.wire.control import AgentState, AgentStatus, DeclineReason

MAX_ERROR_CHARS = 2000  # AgentStatus.last_error holds 2048; leave room for the ellipsis


def versions() -> dict[str, str]:
    """Versions worth knowing when debugging a device.

    Read from the modules themselves (the agent imports them anyway to train), not
    from package metadata, whose parser costs a small device ~3.5 MB of memory.
    """
    import numpy  # noqa: PLC0415 - keep the status module light to import

    from fedmq.runtime.session import onnxruntime_version  # noqa: PLC0415

    return {
        "python": platform.python_version(),
        "fedmq": fedmq.__version__,
        "onnxruntime": onnxruntime_version(),
        "numpy": numpy.__version__,
    }


class StatusBoard:
    """The agent's current state, round, progress, bundle and last error."""

    def __init__(self, client: str, heartbeat_s: float) -> None:
        self.client = client
        self.heartbeat_s = heartbeat_s
        self.state: AgentState = "online"
        self.round: int | None = None
        self.progress: float | None = None
        self.bundle: str | None = None
        self.last_error: str | None = None
        self.declined: DeclineReason | None = None  # with state "declined": why
        self._versions = versions()

    def set(
        self, state: AgentState, round_id: int | None = None, progress: float | None = None
    ) -> None:
        """Enter ``state`` (for ``round_id``); progress restarts unless given."""
        self.state = state
        self.declined = None
        if round_id is not None:
            self.round = round_id
        self.progress = progress

    def decline(self, round_id: int, reason: DeclineReason, message: str) -> None:
        """Say that this agent cannot take part in ``round_id``, and why."""
        self.set("declined", round_id)
        self.declined = reason
        self.error(f"round {round_id}: {message}")

    def report_progress(self, done: int, total: int) -> None:
        """Record ``done`` of ``total`` steps of the current state (thread-safe enough)."""
        self.progress = min(1.0, max(0.0, done / total)) if total > 0 else None

    def error(self, message: str) -> None:
        """Remember the latest problem (shown until the next one)."""
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "…"
        self.last_error = message

    def snapshot(self, now: float, state: AgentState | None = None) -> AgentStatus:
        """The status message as of ``now`` (``state`` overrides, e.g. for the last will)."""
        return AgentStatus(
            client=self.client,
            state=state or self.state,
            round=self.round,
            progress=self.progress,
            bundle=self.bundle,
            versions=self._versions,
            last_error=self.last_error,
            heartbeat_s=self.heartbeat_s,
            declined=self.declined,
            ts=now,
        )
