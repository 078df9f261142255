"""Identifiers that become MQTT topic levels, ACL usernames and state file names."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator

from fedmq.errors import InvalidIdentifierError

MAX_ID_LENGTH = 64  # characters: fits certificate CNs (64) and keeps topics short

# Letters, digits, '.', '_' and '-', starting with a letter or digit: safe as an MQTT topic
# level (no '+', '#', '/', no leading '$'), as a Mosquitto ACL %c/%u substitution, and as a
# file name in a state directory (no '..', no separators).
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def id_problem(value: object, max_length: int = MAX_ID_LENGTH) -> str | None:
    """Return why ``value`` is not a valid identifier, or None when it is valid."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"is {len(value)} characters long, over the limit of {max_length}"
    if not _ID_PATTERN.fullmatch(value):
        return (
            "may contain only letters, digits, '.', '_' and '-' and must start with a "
            "letter or digit (no MQTT wildcards '+'/'#', no '/', no leading '$')"
        )
    return None


def validate_id(value: str, kind: str = "identifier") -> str:
    """Return ``value`` unchanged if it can be used as a topic level, else raise.

    Raises:
        InvalidIdentifierError: naming the identifier kind and what is wrong with it.
    """
    problem = id_problem(value)
    if problem is not None:
        raise InvalidIdentifierError(f"{kind} {value!r} {problem}")
    return value


def validate_root(root: str) -> str:
    """Validate a topic root such as ``fedmq`` or ``plant-7/fedmq`` (levels joined by '/')."""
    if not root:
        raise InvalidIdentifierError("topic root must not be empty")
    for level in root.split("/"):
        validate_id(level, "topic root level")
    return root


def _as_value_error(check: Callable[[str], str]) -> Callable[[str], str]:
    # pydantic reports ValueErrors as validation errors naming the field.
    def validator(value: str) -> str:
        try:
            return check(value)
        except InvalidIdentifierError as exc:
            raise ValueError(str(exc)) from exc

    return validator


Identifier = Annotated[str, AfterValidator(_as_value_error(validate_id))]
"""A pydantic field type for federation, client and update ids."""

TopicRoot = Annotated[str, AfterValidator(_as_value_error(validate_root))]
"""A pydantic field type for topic roots such as ``fedmq`` or ``plant-7/fedmq``."""
