"""Split a labelled dataset across agents: IID, or label-skewed by a Dirichlet prior."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmq.errors import ConfigError

MAX_DIRICHLET_TRIES = 100  # resamples before giving up on a minimum share per agent


@dataclass(frozen=True)
class PartitionSpec:
    """``iid`` or ``dirichlet:ALPHA`` (smaller alpha, more skewed label mixes)."""

    kind: str
    alpha: float = 0.0

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """Parse ``iid`` or ``dirichlet:0.5``.

        Raises:
            ConfigError: anything else, or a non-positive alpha.
        """
        if text == "iid":
            return cls("iid")
        match = re.fullmatch(r"dirichlet:([0-9.eE+-]+)", text)
        if match:
            try:
                alpha = float(match[1])
            except ValueError:
                alpha = -1.0
            if alpha > 0 and np.isfinite(alpha):
                return cls("dirichlet", alpha)
        raise ConfigError(f"partition {text!r} must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0")

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha:g}"


def partition_indices(
    labels: npt.NDArray[np.integer],
    parts: int,
    spec: PartitionSpec,
    *,
    seed: int = 0,
    min_size: int = 2,
) -> list[npt.NDArray[np.int64]]:
    """Return ``parts`` disjoint index arrays covering every example exactly once.

    ``dirichlet`` draws, for each class, the share each agent gets from Dir(alpha),
    the usual label-skew benchmark (Hsu et al., 2019); draws leaving an agent with fewer
    than ``min_size`` examples are redrawn.

    Raises:
        ConfigError: more parts than examples allow.
    """
    count = len(labels)
    if parts < 1 or parts * min_size > count:
        raise ConfigError(f"cannot split {count} examples into {parts} parts of >= {min_size}")
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(count), parts)]
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_TRIES):
        buckets: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(parts)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(parts, spec.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for bucket, piece in zip(buckets, np.split(members, cuts), strict=True):
                bucket.append(piece)
        result = [np.sort(np.concatenate(bucket)).astype(np.int64) for bucket in buckets]
        if min(len(part) for part in result) >= min_size:
            return result
    raise ConfigError(
        f"dirichlet:{spec.alpha:g} left some of {parts} agents with < {min_size} examples "
        f"in {MAX_DIRICHLET_TRIES} draws; raise alpha or use fewer agents"
    )
