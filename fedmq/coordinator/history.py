"""What recent rounds accepted and whom they selected.

The memory behind duplicate and late-update decisions, bounded to the last few rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class History:
    """Accepted update ids, per-round contributors and selections of recent rounds."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}  # (client, update id) -> fold round
        self._contributed: dict[tuple[str, int], int] = {}  # (client, round) -> fold round
        self._selections: dict[int, tuple[str, ...] | None] = {}

    def accepted_in(self, client: str, update_id: str) -> int | None:
        """The round an update id was folded into, if it was accepted."""
        return self._ids.get((client, update_id))

    def contributed(self, client: str, round_id: int) -> bool:
        """True if ``client`` already has an update for ``round_id`` counted."""
        return (client, round_id) in self._contributed

    def record(self, client: str, update_id: str, round_id: int, fold_round: int) -> None:
        """Remember an accepted update."""
        self._ids[(client, update_id)] = fold_round
        self._contributed[(client, round_id)] = fold_round

    def select(self, round_id: int, selected: tuple[str, ...] | None) -> None:
        """Remember whom ``round_id`` selected (None: anyone)."""
        self._selections[round_id] = selected

    def selection(self, round_id: int) -> tuple[bool, tuple[str, ...] | None]:
        """``(known, selected)`` for ``round_id``; ``known`` is False once forgotten."""
        if round_id not in self._selections:
            return False, None
        return True, self._selections[round_id]

    def remembers(self, client: str) -> bool:
        """True if a recent round selected ``client`` or counted its update."""
        return any(
            client in selected for selected in self._selections.values() if selected is not None
        ) or any(c == client for c, _ in self._contributed)

    def forget(self, closed: int, dedupe_rounds: int, max_staleness: int) -> None:
        """Drop what rounds older than the windows still needed can no longer use."""
        horizon = closed - dedupe_rounds
        self._ids = {k: r for k, r in self._ids.items() if r > horizon}
        self._contributed = {k: r for k, r in self._contributed.items() if r > horizon}
        keep = closed - max(max_staleness, 1)
        self._selections = {r: s for r, s in self._selections.items() if r >= keep}

    def to_json(self) -> dict[str, Any]:
        """Snapshot fields (JSON-ready)."""
        return {
            "selections": [
                [r, list(sel) if sel is not None else None]
                for r, sel in sorted(self._selections.items())
            ],
            "ids": [[c, u, r] for (c, u), r in self._ids.items()],
            "contributed": [[c, u, r] for (c, u), r in self._contributed.items()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> History:
        """Restore :meth:`to_json`.

        Raises:
            KeyError, TypeError, ValueError: the fields are malformed.
        """
        history = cls()
        history._selections = {
            int(r): tuple(sel) if sel is not None else None for r, sel in data["selections"]
        }
        history._ids = {(str(c), str(u)): int(r) for c, u, r in data["ids"]}
        history._contributed = {(str(c), int(u)): int(r) for c, u, r in data["contributed"]}
        return history
