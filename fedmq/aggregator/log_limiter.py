"""Rate-limited logging of rejections, so a flood of garbage does not flood the journal.

A hostile or broken client can send thousands of bad chunks a second; each is counted
(status, statistics) but only the first few per reason and interval are logged, and
what was held back is summarised once the interval is over.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

BURST = 5  # lines per reason and interval
INTERVAL = 10.0  # seconds


class LogLimiter:
    """Lets ``BURST`` lines per key through every ``INTERVAL`` seconds, then summarises.

    Args:
        logger: where lines go.
        burst: lines per key and interval.
        interval: seconds.
        clock: monotonic time source.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start: dict[str, float] = {}
        self._sent: Counter[str] = Counter()
        self._held: Counter[str] = Counter()

    def log(
        self,
        key: str,
        level: int,
        message: str,
        *args: object,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Log ``message % args`` unless ``key`` has used up its burst in this interval.

        ``extra``: fields for the log record (``round``, ``client``: see
        :mod:`fedmq.log_format`); the summary line carries only ``reason``.
        """
        now = self._clock()
        start = self._window_start.get(key)
        if start is None or now - start >= self._interval:
            held = self._held.pop(key, 0)
            if held and start is not None:
                self._log.log(
                    level,
                    "%d more like the above (%s) in the last %.0f s",
                    held,
                    key,
                    now - start,
                    extra={"reason": key},
                )
            self._window_start[key] = now
            self._sent[key] = 0
        if self._sent[key] < self._burst:
            self._sent[key] += 1
            self._log.log(level, message, *args, extra=extra)
        else:
            self._held[key] += 1
