"""The topic scheme: build topics and filters, parse received topics.

Every topic of a federation lives under ``<root>/<federation>/``:

==============================  =====================================================
``round``                       retained round announcement (aggregator → agents)
``blob/<sha256>/<i>``           retained chunk *i* of a content-addressed blob
``update/<client>/<round>/<i>``  chunk *i* of a client's update for a round (QoS 1)
``ack/<client>``                accepted/rejected verdict for the client's update
``status/<client>``             retained agent status (last will: offline)
``aggregator/status``           retained aggregator status (last will: offline)
==============================  =====================================================

A device may publish only under ``update/<its id>/`` and ``status/<its id>``, which is what
the ACL templates in ``broker_config/`` grant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmq.errors import InvalidIdentifierError, InvalidTopicError
from fedmq.wire.ids import id_problem, validate_id, validate_root

DEFAULT_ROOT = "fedmq"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_ROUND = 2**53  # rounds are JSON numbers too; keep them exact in every JSON parser
MAX_CHUNK_INDEX = 2**32


@dataclass(frozen=True)
class RoundTopic:
    """``…/round``."""


@dataclass(frozen=True)
class BlobChunkTopic:
    """``…/blob/<sha256>/<index>``."""

    sha256: str
    index: int


@dataclass(frozen=True)
class UpdateChunkTopic:
    """``…/update/<client>/<round>/<index>``."""

    client: str
    round: int
    index: int


@dataclass(frozen=True)
class AckTopic:
    """``…/ack/<client>``."""

    client: str


@dataclass(frozen=True)
class StatusTopic:
    """``…/status/<client>``."""

    client: str


@dataclass(frozen=True)
class AggregatorStatusTopic:
    """``…/aggregator/status``."""


ParsedTopic = (
    RoundTopic | BlobChunkTopic | UpdateChunkTopic | AckTopic | StatusTopic | AggregatorStatusTopic
)


def _check_sha(sha256: str) -> str:
    if not _SHA256_HEX.fullmatch(sha256):
        raise InvalidIdentifierError(f"blob id {sha256!r} is not a lowercase hex sha256")
    return sha256


def _check_index(value: int, what: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < upper:
        raise InvalidIdentifierError(f"{what} {value!r} must be an integer in [0, {upper})")
    return value


def _parse_number(text: str, what: str, upper: int, topic: str) -> int:
    # Only canonical decimal: "007" or "+7" would give one number two topics.
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise InvalidTopicError(f"{what} {text!r} in topic {topic!r} is not a decimal number")
    value = int(text)
    if value >= upper:
        raise InvalidTopicError(f"{what} {value} in topic {topic!r} is out of range")
    return value


def _parse_client(text: str, topic: str) -> str:
    problem = id_problem(text)
    if problem is not None:
        raise InvalidTopicError(f"client id {text!r} in topic {topic!r} {problem}")
    return text


@dataclass(frozen=True)
class Topics:
    """Topic names of one federation under one root.

    Args:
        federation: federation id (a single topic level).
        root: topic root, one or more levels (default ``fedmq``).
    """

    federation: str
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation id")
        validate_root(self.root)

    @property
    def prefix(self) -> str:
        """``<root>/<federation>``."""
        return f"{self.root}/{self.federation}"

    def round(self) -> str:
        """Topic of the retained round announcement."""
        return f"{self.prefix}/round"

    def blob(self, sha256: str, index: int) -> str:
        """Topic of chunk ``index`` of blob ``sha256``."""
        _check_sha(sha256)
        _check_index(index, "chunk index", MAX_CHUNK_INDEX)
        return f"{self.prefix}/blob/{sha256}/{index}"

    def blobs_filter(self) -> str:
        """Filter matching every chunk of every blob of the federation."""
        return f"{self.prefix}/blob/+/+"

    def blob_filter(self, sha256: str) -> str:
        """Filter matching every chunk of blob ``sha256``."""
        return f"{self.prefix}/blob/{_check_sha(sha256)}/+"

    def update(self, client: str, round_id: int, index: int) -> str:
        """Topic of chunk ``index`` of ``client``'s update for round ``round_id``."""
        validate_id(client, "client id")
        _check_index(round_id, "round", MAX_ROUND)
        _check_index(index, "chunk index", MAX_CHUNK_INDEX)
        return f"{self.prefix}/update/{client}/{round_id}/{index}"

    def update_filter(self, client: str = "+") -> str:
        """Filter matching update chunks of one client, or of all clients by default."""
        if client != "+":
            validate_id(client, "client id")
        return f"{self.prefix}/update/{client}/+/+"

    def ack(self, client: str) -> str:
        """Topic where the aggregator answers ``client``'s updates."""
        return f"{self.prefix}/ack/{validate_id(client, 'client id')}"

    def status(self, client: str) -> str:
        """Retained status topic of ``client``."""
        return f"{self.prefix}/status/{validate_id(client, 'client id')}"

    def status_filter(self) -> str:
        """Filter matching every agent's status."""
        return f"{self.prefix}/status/+"

    def aggregator_status(self) -> str:
        """Retained status topic of the aggregator."""
        return f"{self.prefix}/aggregator/status"

    def parse(self, topic: str) -> ParsedTopic:
        """Parse a topic of this federation.

        Raises:
            InvalidTopicError: the topic is outside the federation or does not fit the scheme.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise InvalidTopicError(f"topic {topic!r} is not under {self.prefix!r}")
        levels = topic[len(head) :].split("/")
        match levels:
            case ["round"]:
                return RoundTopic()
            case ["blob", sha256, index] if _SHA256_HEX.fullmatch(sha256):
                return BlobChunkTopic(
                    sha256, _parse_number(index, "chunk index", MAX_CHUNK_INDEX, topic)
                )
            case ["update", client, round_text, index]:
                return UpdateChunkTopic(
                    _parse_client(client, topic),
                    _parse_number(round_text, "round", MAX_ROUND, topic),
                    _parse_number(index, "chunk index", MAX_CHUNK_INDEX, topic),
                )
            case ["ack", client]:
                return AckTopic(_parse_client(client, topic))
            case ["status", client]:
                return StatusTopic(_parse_client(client, topic))
            case ["aggregator", "status"]:
                return AggregatorStatusTopic()
        raise InvalidTopicError(f"topic {topic!r} does not fit the fedmq topic scheme")
