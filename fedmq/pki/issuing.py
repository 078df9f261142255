"""Issuing a certificate: the transaction every identity shares, and each one's own files.

Under the directory's lock the transaction refuses a name that belongs to another kind
of identity, and a second valid certificate unless forced; it refuses (before writing
anything) to overwrite a file unless forced; it records the new certificate, and revokes
those it supersedes, in the index, and only then writes the files: a certificate that
reached a disk is always in the index, so it can always be revoked.

Beside its certificate and key a device gets its provisioning bundle and registry
entry, and the aggregator its ``federation.toml`` lines.  The names and options are
checked by :class:`fedmq.pki.directory.PkiDirectory` before any of this runs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedmq.errors import ConfigError
from fedmq.pki.bundle import AgentConfigValues, agent_toml, archive
from fedmq.pki.ca import CertificateAuthority
from fedmq.pki.certificates import Host, Kind, cert_pem, key_pem, new_key
from fedmq.pki.errors import IdentityConflictError, PkiError
from fedmq.pki.files import (
    PlannedFile,
    check_new,
    key_file_text,
    locked_pki,
    make_private_dir,
    write_planned,
)
from fedmq.pki.index import Index, IndexEntry
from fedmq.pki.layout import CertPaths, PkiLayout
from fedmq.pki.snippets import federation_snippet
from fedmq.wire.signing import SigningKey, read_verify_key

# The files an identity gets beside its certificate, planned once the certificate exists.
ExtraFiles = Callable[[x509.Certificate, ec.EllipticCurvePrivateKey], list[PlannedFile]]


@dataclass(frozen=True)
class Issued:
    """A certificate just issued, and every file written with it."""

    entry: IndexEntry
    cert: CertPaths
    files: tuple[Path, ...]
    superseded: tuple[IndexEntry, ...] = ()  # earlier certificates of the name, now revoked
    extra: Mapping[str, Path] = field(default_factory=dict)  # files by role (bundle, snippet)


def issue_device(
    layout: PkiLayout,
    values: AgentConfigValues,
    *,
    with_archive: bool,
    force: bool,
    days: int,
    when: dt.datetime,
) -> Issued:
    """Issue device ``values.client_id``: certificate, update signing key, registry, bundle.

    Raises:
        IdentityConflictError: the name belongs to another kind of identity.
        ExistingFilesError: bundle or registry files exist and ``force`` is false.
        PkiError: the device has a valid certificate and ``force`` is false, or the
            aggregator's public key is unusable.
    """
    device_id = values.client_id
    config_text = agent_toml(values)
    bundle = layout.bundle(device_id)
    registry = layout.device_key(device_id)
    archive_path = layout.bundle_archive(device_id)
    signing = SigningKey.generate()
    aggregator_key = _aggregator_public_key(layout)

    def extra(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> list[PlannedFile]:
        contents = {
            bundle.CA: layout.ca.cert.read_bytes(),
            bundle.CERT: cert_pem(cert),
            bundle.KEY: key_pem(key),
            bundle.SIGNING_KEY: key_file_text(
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
                key_file_text(f"update signing key of device {device_id}", signing.public.text()),
            )
        )
        if with_archive:
            files.append(PlannedFile(archive_path, archive(contents, device_id), secret=True))
        return files

    targets = [bundle.path(name) for name in bundle.NAMES] + [registry]
    if with_archive:
        targets.append(archive_path)
    issued = _issue(
        layout,
        cn=device_id,
        kind=Kind.device,
        cert_paths=CertPaths(bundle.path(bundle.CERT), bundle.path(bundle.KEY)),
        extra_targets=targets,
        extra=extra,
        prepare=lambda: make_private_dir(bundle.directory),
        force=force,
        days=days,
        when=when,
    )
    roles = {"bundle": bundle.directory, "registry": registry}
    if with_archive:
        roles["archive"] = archive_path
    return Issued(issued.entry, issued.cert, issued.files, issued.superseded, roles)


def issue_aggregator(
    layout: PkiLayout,
    federation: str,
    cn: str,
    broker_url: str,
    *,
    force: bool,
    days: int,
    when: dt.datetime,
) -> Issued:
    """Issue the aggregator's client certificate ``cn`` and its federation.toml lines.

    Raises:
        IdentityConflictError, ExistingFilesError, PkiError: as for :func:`issue_device`.
    """
    snippet_path = layout.federation_snippet(federation)
    snippet = federation_snippet(layout, federation, cn, broker_url).encode("utf-8")
    issued = _issue(
        layout,
        cn=cn,
        kind=Kind.aggregator,
        cert_paths=layout.aggregator(cn),
        extra_targets=[snippet_path],
        extra=lambda cert, key: [PlannedFile(snippet_path, snippet)],
        force=force,
        days=days,
        when=when,
    )
    return Issued(
        issued.entry, issued.cert, issued.files, issued.superseded, {"snippet": snippet_path}
    )


def issue_monitor(
    layout: PkiLayout, cn: str, *, force: bool, days: int, when: dt.datetime
) -> Issued:
    """Issue monitor ``cn``'s client certificate.

    Raises:
        IdentityConflictError, ExistingFilesError, PkiError: as for :func:`issue_device`.
    """
    return _issue(
        layout,
        cn=cn,
        kind=Kind.monitor,
        cert_paths=layout.monitor(cn),
        force=force,
        days=days,
        when=when,
    )


def issue_broker(
    layout: PkiLayout,
    cn: str,
    hosts: Sequence[Host],
    *,
    force: bool,
    days: int,
    when: dt.datetime,
) -> Issued:
    """Issue the broker's server certificate; it supersedes any earlier one.

    Raises:
        IdentityConflictError, ExistingFilesError, PkiError: as for :func:`issue_device`.
    """
    return _issue(
        layout,
        cn=cn,
        kind=Kind.broker,
        cert_paths=layout.broker,
        hosts=hosts,
        # One broker certificate at a time, whatever its first host.
        replaces=lambda entry: entry.kind is Kind.broker,
        force=force,
        days=days,
        when=when,
    )


def _issue(
    layout: PkiLayout,
    *,
    cn: str,
    kind: Kind,
    cert_paths: CertPaths,
    extra_targets: Sequence[Path] = (),
    extra: ExtraFiles | None = None,
    prepare: Callable[[], None] | None = None,
    hosts: Sequence[Host] = (),
    replaces: Callable[[IndexEntry], bool] | None = None,
    force: bool,
    days: int,
    when: dt.datetime,
) -> Issued:
    targets = list(dict.fromkeys([cert_paths.cert, cert_paths.key, *extra_targets]))
    with locked_pki(layout):
        index = Index.load(layout.index)
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
        ca = CertificateAuthority.load(layout.ca)
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
            PlannedFile(layout.issued_copy(entry.serial), cert_pem(cert)),
        ]
        if extra is not None:
            files += extra(cert, key)
        superseded: list[IndexEntry] = []
        for old in current:
            superseded += index.revoke(old.cn, when)
        index.entries.append(entry)
        if superseded:
            files.append(PlannedFile(layout.crl, ca.next_crl(index, when)))
        index.save(layout.index)  # first: whatever is written below is revocable
        if prepare is not None:
            prepare()
        write_planned(files, force=True)
    return Issued(entry, cert_paths, tuple(planned.path for planned in files), tuple(superseded))


def _aggregator_public_key(layout: PkiLayout) -> bytes:
    path = layout.aggregator_public_key
    try:
        read_verify_key(path)  # a device must never pin a broken key
    except ConfigError as exc:
        raise PkiError(f"{exc}; run `fedmq pki init --force` to make a new one") from None
    return path.read_bytes()
