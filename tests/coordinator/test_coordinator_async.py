"""Asynchronous mode (FedBuff): a new model every K updates, staleness-discounted."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.support import SHAPES, Harness, config, delta
from fedmq.coordinator.policy import AsyncPolicy


def _harness(**policy: object) -> Harness:
    values: dict[str, object] = {"buffer_size": 3, "max_staleness": 2, "deadline_s": 100}
    values.update(policy)
    harness = Harness.create(config(mode="async", rounds=10, buffer=AsyncPolicy(**values)))  # type: ignore[arg-type]
    harness.online("a", "b", "c", "d")
    return harness


def test_versions_open_at_once_for_anyone() -> None:
    harness = _harness()
    [announcement] = harness.announcements()
    assert (announcement.mode, announcement.round, announcement.selected) == ("async", 1, None)


def test_every_k_updates_make_a_new_version_with_staleness_weights() -> None:
    harness = _harness()
    harness.update("a", 1, delta(1), examples=10)
    harness.update("b", 1, delta(2), examples=10)
    harness.update("c", 1, delta(3), examples=10)
    assert [(c.round, c.reason) for c in harness.closed] == [(1, "buffer")]
    v2 = {k: v.astype(np.float64) for k, v in harness.coordinator.params.items()}
    # Version 2 is open; d still trains on version 1 (staleness 1), a on version 2.
    harness.update("d", 1, delta(4), examples=10)
    harness.update("a", 2, delta(5), examples=10)
    harness.update("b", 2, delta(6), examples=20)
    weights = [10 / np.sqrt(2), 10, 20]
    deltas = [delta(4), delta(5), delta(6)]
    for name in SHAPES:
        expected = v2[name] + sum(w * d[name] for w, d in zip(weights, deltas, strict=True)) / sum(
            weights
        )
        np.testing.assert_allclose(harness.coordinator.params[name], expected, rtol=1e-5)
    assert [c.staleness for c in harness.records[-1].contributions] == [1, 0, 0]


def test_too_stale_updates_are_rejected() -> None:
    harness = _harness(buffer_size=1, max_staleness=1)
    harness.update("a", 1, delta(1))
    harness.update("b", 2, delta(2))
    assert harness.coordinator.round == 3
    harness.update("c", 1, delta(3))  # trained on version 1, now version 3: staleness 2
    assert harness.acks("c")[-1].reason == "stale_round"
    harness.update("d", 2, delta(4))  # staleness 1: fine
    assert harness.acks("d")[-1].reason == "accepted"


def test_one_update_per_agent_and_version() -> None:
    harness = _harness()
    harness.update("a", 1, delta(1))
    harness.update("a", 1, delta(2))
    assert [(x.accepted, x.reason) for x in harness.acks("a")] == [
        (True, "accepted"),
        (False, "duplicate"),
    ]


@pytest.mark.parametrize(("arrived", "flushed"), [(2, True), (0, False)])
def test_the_deadline_flushes_a_partial_buffer_or_moves_on(arrived: int, flushed: bool) -> None:
    harness = _harness(buffer_size=5, min_updates=2, deadline_s=50)
    for client, seed in list(zip("ab", (1, 2), strict=True))[:arrived]:
        harness.update(client, 1, delta(seed))
    harness.advance(50)
    if flushed:
        assert [(c.round, c.reason) for c in harness.closed] == [(1, "deadline")]
    else:
        assert harness.closed == []
        assert harness.announcements()[-1].deadline == harness.now + 50
