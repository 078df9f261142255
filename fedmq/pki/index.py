"""``index.json``: every certificate the plant CA issued, and which are revoked.

The CRL is regenerated from it, ``fedmq pki revoke NAME`` finds serials by CN in it,
and it keeps one name to one kind of identity.  The CRL's number and issue time are
kept here too, because each new CRL must be strictly newer than the last one (see
:mod:`fedmq.pki.crl`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedmq.durable_files import write_file
from fedmq.pki.certificates import Kind
from fedmq.pki.errors import CorruptPkiError

INDEX_VERSION = 1


def _time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds")


def _parse_time(value: object, what: str) -> dt.datetime:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a timestamp string")
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{what} {value!r} has no time zone")
    return parsed


@dataclass(frozen=True)
class IndexEntry:
    """One issued certificate."""

    serial: int
    cn: str
    kind: Kind
    not_after: dt.datetime
    issued: dt.datetime
    revoked: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this entry (the serial in hex, as ``openssl x509`` prints it)."""
        return {
            "serial": f"{self.serial:x}",
            "cn": self.cn,
            "kind": self.kind.value,
            "issued": _time(self.issued),
            "not_after": _time(self.not_after),
            "revoked": _time(self.revoked) if self.revoked else None,
        }

    @classmethod
    def from_json(cls, item: Any) -> IndexEntry:
        """Parse one entry.

        Raises:
            ValueError, KeyError, TypeError: not an entry ``to_json`` wrote.
        """
        revoked = item["revoked"]
        return cls(
            serial=int(item["serial"], 16),
            cn=str(item["cn"]),
            kind=Kind(item["kind"]),
            issued=_parse_time(item["issued"], "issued"),
            not_after=_parse_time(item["not_after"], "not_after"),
            revoked=None if revoked is None else _parse_time(revoked, "revoked"),
        )


@dataclass
class Index:
    """The index of one PKI directory (load, change, save under the directory lock)."""

    plant: str
    entries: list[IndexEntry] = field(default_factory=list)
    crl_number: int = 0
    crl_last_update: dt.datetime | None = None

    def active(self, cn: str | None = None) -> Iterator[IndexEntry]:
        """Unrevoked certificates, of ``cn`` only if given (expired ones included)."""
        for entry in self.entries:
            if entry.revoked is None and (cn is None or entry.cn == cn):
                yield entry

    def revoked(self) -> Iterator[IndexEntry]:
        """Revoked certificates."""
        return (entry for entry in self.entries if entry.revoked is not None)

    def kind_of(self, cn: str) -> Kind | None:
        """The kind of identity ``cn`` was ever issued as, or None if never."""
        for entry in self.entries:
            if entry.cn == cn:
                return entry.kind
        return None

    def revoke(self, cn: str, when: dt.datetime) -> list[IndexEntry]:
        """Mark every unrevoked certificate of ``cn`` revoked; return them as they were."""
        revoked = []
        for position, entry in enumerate(self.entries):
            if entry.cn == cn and entry.revoked is None:
                self.entries[position] = replace(entry, revoked=when)
                revoked.append(entry)
        return revoked

    def to_json(self) -> dict[str, Any]:
        """The JSON document."""
        return {
            "version": INDEX_VERSION,
            "plant": self.plant,
            "crl_number": self.crl_number,
            "crl_last_update": _time(self.crl_last_update) if self.crl_last_update else None,
            "certificates": [entry.to_json() for entry in self.entries],
        }

    def save(self, path: Path) -> None:
        """Write the index durably (a crash leaves the old or the new one)."""
        text = json.dumps(self.to_json(), indent=2) + "\n"
        write_file(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> Index:
        """Read an index.

        Raises:
            CorruptPkiError: unreadable, not JSON, or not an index; names the file.
        """
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("version") != INDEX_VERSION:
                raise ValueError(f"unknown index version {document.get('version')!r}")
            last = document["crl_last_update"]
            return cls(
                plant=str(document["plant"]),
                entries=[IndexEntry.from_json(item) for item in document["certificates"]],
                crl_number=int(document["crl_number"]),
                crl_last_update=None if last is None else _parse_time(last, "crl_last_update"),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptPkiError(f"cannot read the PKI index {path}: {exc}") from exc
