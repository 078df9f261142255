"""Rebuild the coordinator from the state directory, at every start of ``fedmq serve``.

A new directory gives a fresh coordinator.  Otherwise the last snapshot and the
checkpoint it names restore the coordinator as it was, and the updates stored for the
open round are verified again and replayed in acceptance order, so a round interrupted
by ``kill -9`` resumes with every accepted update counted once (their acks are sent
again: the crash may have come between storing and acking).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy.typing as npt

from fedmq.aggregator.store import StateStore
from fedmq.coordinator.actions import Action
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.validation import UpdateKey, UpdateRejection, UpdateSchema, verify_update
from fedmq.errors import DecodeError, StateError
from fedmq.strategies.strategy import Strategy
from fedmq.wire.update import decode_update_meta

log = logging.getLogger(__name__)


def load_coordinator(
    store: StateStore,
    config: CoordinatorConfig,
    strategy: Strategy,
    schema: UpdateSchema,
    archive: bytes,
    initial: Callable[[], Mapping[str, npt.NDArray[Any]]],
    now: float,
) -> tuple[Coordinator, list[Action]]:
    """The coordinator the state directory holds, and the actions its replay returned.

    Args:
        store: the opened (locked) state directory.
        config: the coordinator configuration.
        strategy: a fresh strategy object.
        schema: what a valid update looks like.
        archive: the bundle archive blob.
        initial: the bundle's initial parameters (read only for a new directory).
        now: current unix time.

    Raises:
        ConfigError: the directory belongs to another federation, bundle or mode.
        StateError: the snapshot, a checkpoint or a stored update is unusable.
    """
    snapshot = store.load_snapshot()
    if snapshot is None:
        log.info("new state directory %s", store.root)
        return Coordinator(config, strategy, schema, archive, initial(), now=now), []
    checkpoint = snapshot.get("checkpoint")
    if not isinstance(checkpoint, int):
        raise StateError(f"{store.root}/state.json names no checkpoint")
    params, optimizer = store.load_checkpoint(checkpoint)
    coordinator = Coordinator.restore(
        config, strategy, schema, archive, snapshot, params, optimizer, now=now
    )
    finished = coordinator.phase == "finished"
    # Rounds before the open one live in checkpoints; a crash may have left their files.
    store.prune_updates(coordinator.round + 1 if finished else coordinator.round)
    replayed: list[Action] = []
    stored = [] if finished else store.stored_updates(coordinator.round)
    for item in stored:
        data = item.path.read_bytes()
        try:
            meta, _ = decode_update_meta(data, schema.limits)
        except DecodeError as exc:
            raise StateError(f"stored update {item.path} is corrupt: {exc}") from exc
        result = verify_update(UpdateKey(meta.client, meta.round, meta.update_id), data, schema)
        if isinstance(result, UpdateRejection):
            raise StateError(f"stored update {item.path} no longer verifies: {result.detail}")
        replayed.extend(coordinator.replay(result, item.seq, now))
    log.info(
        "resumed round %d (%s) with %d stored updates",
        coordinator.round,
        coordinator.phase,
        len(stored),
    )
    return coordinator, replayed
