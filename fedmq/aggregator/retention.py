"""Which checkpoints the state directory keeps (``[retention]`` in ``federation.toml``).

The service writes one checkpoint per round (``checkpoints/<round>.params`` and
``.optimizer``); a long federation of a large model would fill the disk.  The policy
keeps the newest ``keep_last`` checkpoints and every round that is a multiple of
``keep_every`` (round 0, the initial model, is a multiple of every N), and **always**
the checkpoints that must stay for correctness: the one the committed ``state.json``
names (what a restart loads) and the one just written (what the next snapshot will
name).  ``0`` turns a rule off: ``keep_last = 0, keep_every = 1`` keeps everything;
``keep_last = 0, keep_every = 0`` keeps only what recovery needs.

Pure: :meth:`CheckpointRetention.prunable` takes the rounds on disk and returns the ones
to delete.  The store (:class:`~fedmq.aggregator.store.StateStore`) applies it after
each checkpoint write and each snapshot that moves the committed checkpoint, so the
coordinator never hears of it: pruning is disk housekeeping, not federation state.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

DEFAULT_KEEP_LAST = 5  # rounds: enough to roll back a few bad rounds or export recent models
DEFAULT_KEEP_EVERY = 10  # rounds: a sparse history for later comparison (and round 0)


@dataclass(frozen=True)
class CheckpointRetention:
    """Keep the newest ``keep_last`` checkpoints and every ``keep_every``-th round.

    Args:
        keep_last: newest checkpoints kept (0: this rule keeps none).
        keep_every: rounds divisible by this are kept (0: this rule keeps none).
    """

    keep_last: int = DEFAULT_KEEP_LAST
    keep_every: int = DEFAULT_KEEP_EVERY

    def __post_init__(self) -> None:
        if self.keep_last < 0 or self.keep_every < 0:
            raise ValueError("keep_last and keep_every must be >= 0 (0: the rule is off)")

    @property
    def keeps_everything(self) -> bool:
        """True when no checkpoint is ever pruned."""
        return self.keep_every == 1

    def kept(self, rounds: Iterable[int], protect: Collection[int] = ()) -> set[int]:
        """The rounds among ``rounds`` that stay (``protect``: kept whatever the rules)."""
        ordered = sorted(set(rounds))
        keep = {r for r in ordered if r in protect}
        if self.keep_last:
            keep.update(ordered[-self.keep_last :])
        if self.keep_every:
            keep.update(r for r in ordered if r % self.keep_every == 0)
        return keep

    def prunable(self, rounds: Iterable[int], protect: Collection[int] = ()) -> list[int]:
        """The rounds among ``rounds`` to delete, ascending."""
        present = set(rounds)
        return sorted(present - self.kept(present, protect))


KEEP_ALL = CheckpointRetention(keep_last=0, keep_every=1)
"""Never prune (what ``fedmq simulate`` uses: its report evaluates every round)."""
