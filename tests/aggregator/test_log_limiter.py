"""The rejection log limiter: a burst per reason, then one summary line per interval."""

from __future__ import annotations

import logging

import pytest

from fedmq.aggregator.log_limiter import LogLimiter


def test_a_flood_logs_a_burst_and_then_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = LogLimiter(
        logging.getLogger("limiter-test"), burst=3, interval=10, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="limiter-test"):
        for i in range(1000):
            limiter.log("unknown_client", logging.WARNING, "rejected chunk %d", i)
        limiter.log("bad_signature", logging.WARNING, "other reason")
        now[0] = 10.5
        limiter.log("unknown_client", logging.WARNING, "rejected chunk %d", 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "rejected chunk 0",
        "rejected chunk 1",
        "rejected chunk 2",
        "other reason",
        "997 more like the above (unknown_client) in the last 10 s",
        "rejected chunk 1000",
    ]
