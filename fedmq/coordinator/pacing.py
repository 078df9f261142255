"""Upload pacing: how many agents may upload at once so a round fits the broker's queue.

A broker queues QoS 1 messages for a subscriber beyond its in-flight window and drops
them past ``max_queued_messages`` while the publisher still gets PUBACK
(``broker_config/README.md``).  The aggregator is that subscriber, and a round's
uploads arrive at once.  With ``[broker] max_queued_messages`` set, the announcement
carries ``upload_slots``: each agent first sends only chunk 0 of its update (who it is,
what it sends), and the aggregator grants the rest to at most ``upload_slots`` updates
at a time, in the order their first chunks arrived.  A grant is a resend request naming
the missing chunks (:class:`~fedmq.wire.control.ResendRequest`), so granting reuses the
signed message and the agent code that recovers lost chunks; when an upload completes,
the next waiting update is granted.

The rule, for ``A`` agents whose updates have ``C`` chunks each and a queue of ``Q``::

    upload_slots = floor((Q - 2 x A) / C)        (at least 1)

The ``2 x A`` covers every agent's first chunk and its status messages, which share the
aggregator's queue; ``upload_slots x C`` the uploads in progress.  When every agent
fits at once (``A x C + 2 x A <= Q``) there is no pacing: agents send everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmq.wire.tensor_codecs import CodecSpec

# Per-element bytes of an update tensor under each codec, before zstd (which only
# shrinks it): the basis of the chunk count an update is expected to need.
_INDEX_BYTES = 4  # topk sends an int32 index beside each kept value
UPDATE_HEADER_BYTES = 4096  # envelope, metrics and tensor-set header, generously


def element_bytes(codec: CodecSpec) -> float:
    """Bytes one float32 update element takes under ``codec`` (upper bound)."""
    if codec.name == "fp16":
        return 2.0
    if codec.name == "int8":
        return 1.0 + 4.0 / codec.block  # one float32 scale per block
    if codec.name == "topk":
        return codec.fraction * (4.0 + _INDEX_BYTES)
    return 4.0


def expected_update_bytes(shapes: Mapping[str, tuple[int, ...]], codec: CodecSpec) -> int:
    """What one update of these tensor shapes is expected to weigh on the wire."""
    elements = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
    return math.ceil(elements * element_bytes(codec)) + UPDATE_HEADER_BYTES


def upload_slots(queue: int | None, agents: int, chunks_per_update: int) -> int | None:
    """Concurrent uploads that fit a broker queue of ``queue`` messages.

    Args:
        queue: the broker's per-subscriber queue limit (None or 0: unknown/unlimited).
        agents: agents that may upload in the round.
        chunks_per_update: chunks one update is expected to need.

    Returns:
        The slot count to announce, or None when no pacing is needed (every agent's
        upload fits the queue at once, or the queue is unlimited).
    """
    if not queue or agents < 1:
        return None
    chunks = max(1, chunks_per_update)
    budget = queue - 2 * agents
    if agents * chunks <= budget:
        return None
    return max(1, budget // chunks)
