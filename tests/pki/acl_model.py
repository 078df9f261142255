"""Mosquitto 2.0's acl_file semantics, to evaluate a generated ACL without a broker.

Transcribed from ``mosquitto_acl_check_default`` (src/security_default.c, v2.0.11): a
client's own ``topic`` lines are checked first, then every ``pattern`` line with ``%u``
and ``%c`` substituted; in each list a matching ``deny`` line refuses at once (denials
are checked first), a matching line granting the access allows, and nothing matching
refuses.  Subscriptions are always allowed; what is read is checked per delivered
message, which is what ``may(…, "read")`` answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

READ, WRITE = 1, 2
ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}
Access = Literal["read", "write"]


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` this level and everything below)."""
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False
    filters, levels = topic_filter.split("/"), topic.split("/")
    for position, part in enumerate(filters):
        if part == "#":
            return True
        if position >= len(levels) or (part not in ("+", levels[position])):
            return False
    return len(filters) == len(levels)


@dataclass
class AclModel:
    patterns: list[tuple[int, str]] = field(default_factory=list)
    users: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> AclModel:
        model = cls()
        current: list[tuple[int, str]] | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            if keyword == "user":
                current = model.users.setdefault(rest.strip(), [])
                continue
            access, _, topic = rest.strip().partition(" ")
            if topic == "":  # "topic <topic>" means readwrite
                access, topic = "readwrite", access
            entry = (ACCESS[access], topic.strip())
            if keyword == "pattern":
                model.patterns.append(entry)
            elif keyword == "topic":
                assert current is not None, "topic line before any user line"
                current.append(entry)
            else:
                raise ValueError(f"unknown ACL line {raw!r}")
        return model

    @staticmethod
    def _check(entries: list[tuple[int, str]], topic: str, access: int) -> bool | None:
        for bits, topic_filter in entries:
            if bits == 0 and matches(topic_filter, topic):
                return False
        for bits, topic_filter in entries:
            if bits & access and matches(topic_filter, topic):
                return True
        return None

    def may(self, username: str, topic: str, access: Access) -> bool:
        bits = READ if access == "read" else WRITE
        own = self._check(self.users.get(username, []), topic, bits)
        if own is False:
            return False
        if own:
            return True
        substituted = [
            (entry_bits, entry.replace("%u", username).replace("%c", username))
            for entry_bits, entry in self.patterns
        ]
        return bool(self._check(substituted, topic, bits))
