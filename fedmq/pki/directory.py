"""A PKI directory and everything ``fedmq pki`` does to it.

Every operation that changes the directory holds its lock, plans its files, refuses
(before writing anything) to overwrite one unless forced, records the new certificate
in the index, and only then writes the files: a certificate that reached a disk is
always in the index, so it can always be revoked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmq.errors import ConfigError, InvalidIdentifierError
from fedmq.pki.acl import AclFile, federation_acl
from fedmq.pki.bundle import (
    DEFAULT_BROKER_URL,
    DEFAULT_INSTALL_DIR,
    DEFAULT_STATE_DIR,
    AgentConfigValues,
    agent_toml,
    archive,
    check_broker_url,
)
from fedmq.pki.ca import CA_DAYS, CertificateAuthority
from fedmq.pki.certificates import Host, Kind, cert_pem, key_pem, new_key, parse_hosts
from fedmq.pki.crl import next_last_update
from fedmq.pki.errors import (
    IdentityConflictError,
    InvalidNameError,
    PkiError,
    PkiNotFoundError,
    UnknownIdentityError,
)
from fedmq.pki.files import (
    PlannedFile,
    check_new,
    locked,
    make_private_dir,
    remove_file,
    write_planned,
)
from fedmq.pki.index import Index, IndexEntry
from fedmq.pki.layout import CertPaths, PkiLayout
from fedmq.pki.snippets import federation_snippet
from fedmq.wire.ids import validate_id, validate_root
from fedmq.wire.signing import SigningKey, read_verify_key
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
class Issued:
    """A certificate just issued, and every file written with it."""

    entry: IndexEntry
    cert: CertPaths
    files: tuple[Path, ...]
    superseded: tuple[IndexEntry, ...] = ()  # earlier certificates of the name, now revoked
    extra: Mapping[str, Path] = field(default_factory=dict)  # files by role (bundle, snippet)


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
                pki._crl_file(ca, index, when),
                PlannedFile(
                    layout.aggregator_signing_key,
                    _key_text(
                        f"the aggregator's signing key of plant {plant} (secret)", signing.text()
                    ),
                    secret=True,
                ),
                PlannedFile(
                    layout.aggregator_public_key,
                    _key_text(
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
        config_text = agent_toml(values)
        bundle = self.layout.bundle(device_id)
        registry = self.layout.device_key(device_id)
        archive_path = self.layout.bundle_archive(device_id)
        signing = SigningKey.generate()
        aggregator_key = self._aggregator_public_key()

        def extra(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> list[PlannedFile]:
            contents = {
                bundle.CA: self.layout.ca.cert.read_bytes(),
                bundle.CERT: cert_pem(cert),
                bundle.KEY: key_pem(key),
                bundle.SIGNING_KEY: _key_text(
                    f"update signing key of device {device_id} (secret)", signing.text()
                ),
                bundle.AGGREGATOR_KEY: aggregator_key,
                bundle.AGENT_CONFIG: config_text.encode("utf-8"),
            }
            secret = {bundle.KEY, bundle.SIGNING_KEY}
            files = [
                PlannedFile(bundle.path(name), data, secret=name in secret)
                for name, data in contents.items()
                if name not in (bundle.CERT, bundle.KEY)  # written by _issue
            ]
            files.append(
                PlannedFile(
                    registry,
                    _key_text(f"update signing key of device {device_id}", signing.public.text()),
                )
            )
            if with_archive:
                files.append(PlannedFile(archive_path, archive(contents, device_id), secret=True))
            return files

        targets = [bundle.path(name) for name in bundle.NAMES] + [registry]
        if with_archive:
            targets.append(archive_path)
        issued = self._issue(
            cn=device_id,
            kind=Kind.device,
            cert_paths=CertPaths(bundle.path(bundle.CERT), bundle.path(bundle.KEY)),
            extra_targets=targets,
            extra=extra,
            prepare=lambda: make_private_dir(bundle.directory),
            force=force,
            days=days,
            now=now,
        )
        roles = {"bundle": bundle.directory, "registry": registry}
        if with_archive:
            roles["archive"] = archive_path
        return Issued(issued.entry, issued.cert, issued.files, issued.superseded, roles)

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
        snippet_path = self.layout.federation_snippet(federation)
        snippet = federation_snippet(self.layout, federation, cn, broker_url).encode("utf-8")
        issued = self._issue(
            cn=cn,
            kind=Kind.aggregator,
            cert_paths=self.layout.aggregator(cn),
            extra_targets=[snippet_path],
            extra=lambda cert, key: [PlannedFile(snippet_path, snippet)],
            force=force,
            days=days,
            now=now,
        )
        return Issued(
            issued.entry, issued.cert, issued.files, issued.superseded, {"snippet": snippet_path}
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
        return self._issue(
            cn=cn,
            kind=Kind.monitor,
            cert_paths=self.layout.monitor(cn),
            force=force,
            days=days,
            now=now,
        )

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
        return self._issue(
            cn=hosts[0].lower(),
            kind=Kind.broker,
            cert_paths=self.layout.broker,
            hosts=names,
            # One broker certificate at a time, whatever its first host.
            replaces=lambda entry: entry.kind is Kind.broker,
            force=force,
            days=days,
            now=now,
        )

    def _issue(
        self,
        *,
        cn: str,
        kind: Kind,
        cert_paths: CertPaths,
        extra_targets: Sequence[Path] = (),
        extra: Callable[[x509.Certificate, ec.EllipticCurvePrivateKey], list[PlannedFile]]
        | None = None,
        prepare: Callable[[], None] | None = None,
        hosts: Sequence[Host] = (),
        replaces: Callable[[IndexEntry], bool] | None = None,
        force: bool,
        days: int,
        now: dt.datetime | None,
    ) -> Issued:
        when = _now(now)
        targets = list(dict.fromkeys([cert_paths.cert, cert_paths.key, *extra_targets]))
        with self._locked():
            index = self.index()
            other = index.kind_of(cn)
            if other is not None and other is not kind:
                raise IdentityConflictError(
                    f"{cn!r} is already the name of a {other.value} certificate; a "
                    f"{kind.value} needs another name (the CN is the broker username the "
                    "ACL grants by)"
                )
            replaced = replaces or (lambda entry: entry.cn == cn)
            current = [entry for entry in index.active() if replaced(entry)]
            if current and not force:
                serials = ", ".join(f"{entry.serial:x}" for entry in current)
                raise PkiError(
                    f"{cn!r} already has a valid {kind.value} certificate (serial {serials}); "
                    "pass --force to issue a new one, which revokes the old one"
                )
            check_new(targets, force=force)
            ca = self.ca()
            key = new_key()
            cert = ca.issue(
                cn=cn, kind=kind, public_key=key.public_key(), now=when, days=days, hosts=hosts
            )
            entry = IndexEntry(
                serial=cert.serial_number,
                cn=cn,
                kind=kind,
                issued=when,
                not_after=cert.not_valid_after_utc,
            )
            files = [
                PlannedFile(cert_paths.cert, cert_pem(cert)),
                PlannedFile(cert_paths.key, key_pem(key), secret=True),
                PlannedFile(self.layout.issued_copy(entry.serial), cert_pem(cert)),
            ]
            if extra is not None:
                files += extra(cert, key)
            superseded: list[IndexEntry] = []
            for old in current:
                superseded += index.revoke(old.cn, when)
            index.entries.append(entry)
            if superseded:
                files.append(self._crl_file(ca, index, when))
            index.save(self.layout.index)  # first: whatever is written below is revocable
            if prepare is not None:
                prepare()
            write_planned(files, force=True)
        return Issued(
            entry, cert_paths, tuple(planned.path for planned in files), tuple(superseded)
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
        with self._locked():
            index = self.index()
            kind = index.kind_of(name)
            entries = index.revoke(name, when)
            if not entries:
                if kind is None:
                    raise UnknownIdentityError(
                        f"no certificate was issued to {name!r} (`fedmq pki list` shows them)"
                    )
                raise UnknownIdentityError(f"every certificate of {name!r} is revoked already")
            crl = self._crl_file(self.ca(), index, when)
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
        with self._locked():
            key = SigningKey.generate()
            write_planned(
                [
                    PlannedFile(
                        secret,
                        _key_text(f"aggregator signing key {name} (secret)", key.text()),
                        secret=True,
                    ),
                    PlannedFile(
                        public, _key_text(f"aggregator public key {name}", key.public.text())
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

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.layout.index.is_file():
            raise PkiNotFoundError(self.root)
        with locked(self.root):
            yield

    def _aggregator_public_key(self) -> bytes:
        path = self.layout.aggregator_public_key
        try:
            read_verify_key(path)  # a device must never pin a broken key
        except ConfigError as exc:
            raise PkiError(f"{exc}; run `fedmq pki init --force` to make a new one") from None
        return path.read_bytes()

    def _crl_file(self, ca: CertificateAuthority, index: Index, when: dt.datetime) -> PlannedFile:
        """Bump the index's CRL number and time; the CRL file to write."""
        index.crl_number += 1
        index.crl_last_update = next_last_update(index.crl_last_update, when)
        crl = ca.crl(index.revoked(), number=index.crl_number, last_update=index.crl_last_update)
        return PlannedFile(self.layout.crl, crl.public_bytes(serialization.Encoding.PEM))


def _check_root(root: str) -> None:
    try:
        validate_root(root)
    except InvalidIdentifierError as exc:
        raise InvalidNameError(str(exc)) from None


def _key_text(comment: str, line: str) -> bytes:
    # The key format ignores '#' lines: a comment tells an operator what a file is.
    return f"# {comment}\n{line}\n".encode("ascii")
