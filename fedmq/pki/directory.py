"""A PKI directory and everything ``fedmq pki`` does to it.

:class:`PkiDirectory` checks an operator's names and options, then changes the directory
under its lock: every operation plans its files, refuses (before writing anything) to
overwrite one unless forced, records new certificates and revocations in the index, and
only then writes the files.  Issuing itself, and the files each kind of identity gets,
are in :mod:`fedmq.pki.issuing`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import InvalidIdentifierError
from fedmq.pki.acl import AclFile, federation_acl
from fedmq.pki.bundle import (
    DEFAULT_BROKER_URL,
    DEFAULT_INSTALL_DIR,
    DEFAULT_STATE_DIR,
    AgentConfigValues,
    check_broker_url,
)
from fedmq.pki.ca import CA_DAYS, CertificateAuthority
from fedmq.pki.certificates import Host, Kind, cert_pem, key_pem, parse_hosts
from fedmq.pki.errors import InvalidNameError, PkiError, PkiNotFoundError, UnknownIdentityError
from fedmq.pki.files import (
    PlannedFile,
    check_new,
    key_file_text,
    locked,
    locked_pki,
    remove_file,
    write_planned,
)
from fedmq.pki.index import Index, IndexEntry
from fedmq.pki.issuing import Issued, issue_aggregator, issue_broker, issue_device, issue_monitor
from fedmq.pki.layout import PkiLayout
from fedmq.wire.ids import validate_id, validate_root
from fedmq.wire.signing import SigningKey
from fedmq.wire.topics import DEFAULT_ROOT

DEFAULT_DIR = Path("pki")
CLIENT_DAYS = 1825  # five years: devices are re-provisioned rarely, and revocable
DEFAULT_MONITOR = "monitor"


def aggregator_client_id(federation: str) -> str:
    """The aggregator's default MQTT client id, as ``fedmq serve`` picks it."""
    return f"fedmq-aggregator-{federation}"


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it can be a certificate CN, MQTT username and topic level.

    Raises:
        InvalidNameError: naming ``what`` and the problem.
    """
    try:
        return validate_id(value, what)
    except InvalidIdentifierError as exc:
        raise InvalidNameError(str(exc)) from None


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)


@dataclass(frozen=True)
class Revoked:
    """What ``revoke`` did."""

    entries: tuple[IndexEntry, ...]
    crl: Path
    unregistered: Path | None  # the device registry key deleted, if there was one


class PkiDirectory:
    """A plant's PKI directory: the CA, the index, the issued identities.

    Use :meth:`create` for a new plant and :meth:`open` afterwards.
    """

    def __init__(self, root: Path) -> None:
        self.layout = PkiLayout(root)

    @property
    def root(self) -> Path:
        """The directory."""
        return self.layout.root

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(
        cls,
        root: Path,
        plant: str,
        *,
        force: bool = False,
        days: int = CA_DAYS,
        now: dt.datetime | None = None,
    ) -> tuple[PkiDirectory, tuple[Path, ...]]:
        """Make the plant CA, the aggregator's signing key pair and an empty CRL.

        With ``force`` an existing CA is replaced, which makes every certificate it
        issued untrusted: every identity must be issued and provisioned again.

        Returns:
            The directory and the files written.

        Raises:
            InvalidNameError: the plant name is unusable.
            ExistingFilesError: the directory holds a CA and ``force`` is false.
        """
        check_name(plant, "plant name")
        if days < 1:
            raise PkiError(f"--days must be at least 1, not {days}")
        pki = cls(root)
        layout = pki.layout
        when = _now(now)
        targets = [
            layout.ca.cert,
            layout.ca.key,
            layout.crl,
            layout.index,
            layout.aggregator_signing_key,
            layout.aggregator_public_key,
        ]
        check_new(targets, force=force)
        root.mkdir(parents=True, exist_ok=True)
        with locked(root):
            check_new(targets, force=force)  # another command may have won the race
            ca = CertificateAuthority.create(plant, when, days)
            index = Index(plant)
            signing = SigningKey.generate()
            files = [
                PlannedFile(layout.ca.cert, cert_pem(ca.cert)),
                PlannedFile(layout.ca.key, key_pem(ca.key), secret=True),
                PlannedFile(layout.crl, ca.next_crl(index, when)),
                PlannedFile(
                    layout.aggregator_signing_key,
                    key_file_text(
                        f"the aggregator's signing key of plant {plant} (secret)", signing.text()
                    ),
                    secret=True,
                ),
                PlannedFile(
                    layout.aggregator_public_key,
                    key_file_text(
                        f"the aggregator's public key of plant {plant}", signing.public.text()
                    ),
                ),
            ]
            write_planned(files, force=True)
            index.save(layout.index)  # last: an index means a complete CA
        return pki, (*(planned.path for planned in files), layout.index)

    @classmethod
    def open(cls, root: Path) -> PkiDirectory:
        """A directory that ``create`` initialised.

        Raises:
            PkiNotFoundError: it holds no CA (or no index).
        """
        pki = cls(root)
        if not (pki.layout.ca.cert.is_file() and pki.layout.index.is_file()):
            raise PkiNotFoundError(root)
        return pki

    def index(self) -> Index:
        """The current index (read from disk)."""
        return Index.load(self.layout.index)

    def ca(self) -> CertificateAuthority:
        """The plant CA (reads its private key)."""
        return CertificateAuthority.load(self.layout.ca)

    # ------------------------------------------------------------------ issuing

    def device(
        self,
        device_id: str,
        *,
        federation: str,
        broker_url: str = DEFAULT_BROKER_URL,
        topic_root: str = DEFAULT_ROOT,
        install_dir: str = DEFAULT_INSTALL_DIR,
        state_dir: str = DEFAULT_STATE_DIR,
        with_archive: bool = False,
        force: bool = False,
        days: int = CLIENT_DAYS,
        now: dt.datetime | None = None,
    ) -> Issued:
        """Issue a device: its certificate, update signing key, registry entry and bundle.

        Raises:
            InvalidNameError: the device or federation id is unusable.
            IdentityConflictError: the name belongs to another kind of identity.
            ExistingFilesError: bundle or registry files exist and ``force`` is false.
            PkiError: the device has a valid certificate and ``force`` is false.
        """
        check_name(device_id, "device id")
        _check_root(topic_root)
        values = AgentConfigValues(
            client_id=device_id,
            federation=check_name(federation, "federation id"),
            topic_root=topic_root,
            broker_url=check_broker_url(broker_url),
            install_dir=install_dir,
            state_dir=state_dir,
        )
        return issue_device(
            self.layout, values, with_archive=with_archive, force=force, days=days, when=_now(now)
        )

    def aggregator(
        self,
        federation: str,
        *,
        client_id: str | None = None,
        broker_url: str = DEFAULT_BROKER_URL,
        force: bool = False,
        days: int = CLIENT_DAYS,
        now: dt.datetime | None = None,
    ) -> Issued:
        """Issue the aggregator's client certificate (CN = its MQTT client id).

        Also writes ``aggregator/federation-security-<federation>.toml``: the
        federation.toml lines naming these files.

        Raises:
            InvalidNameError, IdentityConflictError, ExistingFilesError, PkiError: as
                for :meth:`device`.
        """
        check_name(federation, "federation id")
        cn = check_name(client_id or aggregator_client_id(federation), "aggregator client id")
        check_broker_url(broker_url)
        return issue_aggregator(
            self.layout, federation, cn, broker_url, force=force, days=days, when=_now(now)
        )

    def monitor(
        self,
        name: str = DEFAULT_MONITOR,
        *,
        force: bool = False,
        days: int = CLIENT_DAYS,
        now: dt.datetime | None = None,
    ) -> Issued:
        """Issue a read-only monitor identity (what it may read is the ACL's business).

        Raises:
            InvalidNameError, IdentityConflictError, ExistingFilesError, PkiError: as
                for :meth:`device`.
        """
        cn = check_name(name, "monitor name")
        return issue_monitor(self.layout, cn, force=force, days=days, when=_now(now))

    def broker(
        self,
        hosts: Sequence[str],
        *,
        force: bool = False,
        days: int = CLIENT_DAYS,
        now: dt.datetime | None = None,
    ) -> Issued:
        """Issue the broker's server certificate for ``hosts`` (DNS names and IP addresses).

        The first host is the CN; all of them are subject alternative names, which is
        what clients check.  A new broker certificate revokes the previous one.

        Raises:
            InvalidNameError: no host, or one that is neither a DNS name nor an IP.
            ExistingFilesError: the broker's files exist and ``force`` is false.
        """
        if not hosts:
            raise InvalidNameError("give at least one --host: the name devices connect to")
        try:
            names: list[Host] = parse_hosts(hosts)
        except ValueError as exc:
            raise InvalidNameError(f"--host {exc}") from None
        return issue_broker(
            self.layout, hosts[0].lower(), names, force=force, days=days, when=_now(now)
        )

    # ------------------------------------------------------------------ revoking

    def revoke(self, name: str, *, now: dt.datetime | None = None) -> Revoked:
        """Revoke every valid certificate of ``name`` and regenerate the CRL.

        A device also leaves the registry (``devices/<id>.pub``), so the aggregator
        stops accepting its updates at once; the broker refuses its certificate once
        it reloads the CRL (SIGHUP or restart).

        Raises:
            UnknownIdentityError: nothing valid was issued to ``name``.
        """
        when = _now(now)
        with locked_pki(self.layout):
            index = self.index()
            kind = index.kind_of(name)
            entries = index.revoke(name, when)
            if not entries:
                if kind is None:
                    raise UnknownIdentityError(
                        f"no certificate was issued to {name!r} (`fedmq pki list` shows them)"
                    )
                raise UnknownIdentityError(f"every certificate of {name!r} is revoked already")
            crl = PlannedFile(self.layout.crl, self.ca().next_crl(index, when))
            index.save(self.layout.index)
            write_planned([crl], force=True)
            unregistered = None
            if kind is Kind.device:
                registry = self.layout.device_key(name)
                unregistered = registry if remove_file(registry) else None
        return Revoked(tuple(entries), crl.path, unregistered)

    # ------------------------------------------------------------------ broker files

    def acl(
        self,
        federations: Sequence[str],
        *,
        aggregator: str | None = None,
        monitors: Sequence[str] | None = None,
        root: str = DEFAULT_ROOT,
    ) -> AclFile:
        """The Mosquitto ACL of ``federations``.

        Args:
            federations: the federations the broker serves.
            aggregator: the aggregator's client id (only with one federation; default
                ``fedmq-aggregator-<federation>``).
            monitors: monitor names; default every valid monitor certificate issued.
            root: the topic root.

        Raises:
            InvalidNameError: a bad id, or ``aggregator`` with several federations.
        """
        if not federations:
            raise InvalidNameError("give at least one --federation")
        if aggregator is not None and len(federations) != 1:
            raise InvalidNameError("--aggregator applies to one --federation only")
        for federation in federations:
            check_name(federation, "federation id")
        clients = {
            federation: aggregator or aggregator_client_id(federation) for federation in federations
        }
        if monitors is None:
            monitors = sorted(
                {entry.cn for entry in self.index().active() if entry.kind is Kind.monitor}
            )
        return federation_acl(clients, monitors, root)

    def signing_key(self, name: str, *, force: bool = False) -> tuple[Path, Path]:
        """A further aggregator signing key pair, ``aggregator/<name>.sign`` and ``.pub``.

        For a key rotation: devices pin both public keys for a while (docs/deploy.md).

        Raises:
            ExistingFilesError: the files exist and ``force`` is false.
        """
        check_name(name, "key name")
        directory = self.layout.aggregator_signing_key.parent
        secret, public = directory / f"{name}.sign", directory / f"{name}.pub"
        with locked_pki(self.layout):
            key = SigningKey.generate()
            write_planned(
                [
                    PlannedFile(
                        secret,
                        key_file_text(f"aggregator signing key {name} (secret)", key.text()),
                        secret=True,
                    ),
                    PlannedFile(
                        public, key_file_text(f"aggregator public key {name}", key.public.text())
                    ),
                ],
                force=force,
            )
        return secret, public

    def write_text(self, path: Path, text: str, *, force: bool = False) -> Path:
        """Write a generated public file (the ACL, a broker configuration).

        Raises:
            ExistingFilesError: ``path`` exists and ``force`` is false.
        """
        write_planned([PlannedFile(path, text.encode("utf-8"))], force=force)
        return path


def _check_root(root: str) -> None:
    try:
        validate_root(root)
    except InvalidIdentifierError as exc:
        raise InvalidNameError(str(exc)) from None
