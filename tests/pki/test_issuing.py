"""fedmq.pki: the CA, the certificates it issues, file modes, overwrite protection, revocation."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq.durable_files import lock_directory
from fedmq.errors import ConfigError
from fedmq.pki.certificates import Kind, common_name, read_cert, read_key
from fedmq.pki.directory import PkiDirectory
from fedmq.pki.errors import (
    ExistingFilesError,
    IdentityConflictError,
    InvalidNameError,
    PkiBusyError,
    PkiError,
    PkiNotFoundError,
    UnknownIdentityError,
)
from fedmq.pki.layout import CertPaths
from fedmq.wire.signing import read_signing_key, read_verify_key
from pki.plant import Plant


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_crl(pki: PkiDirectory) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pki.layout.crl.read_bytes())


def check_issued(
    pki: PkiDirectory, paths: CertPaths, cn: str, usage: x509.ObjectIdentifier
) -> x509.Certificate:
    ca = read_cert(pki.layout.ca.cert)
    cert = read_cert(paths.cert)
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert common_name(cert) == cn
    assert read_key(paths.key).public_key() == cert.public_key()
    assert mode(paths.key) == 0o600
    assert mode(paths.cert) == 0o644
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    assert pki.layout.issued_copy(cert.serial_number).read_bytes() == paths.cert.read_bytes()
    return cert


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0)  # files must not rely on the umask for their modes
    try:
        yield
    finally:
        os.umask(previous)


def test_init_makes_the_ca_an_empty_crl_and_the_signing_key(
    tmp_path: Path, permissive_umask: None
) -> None:
    pki, files = PkiDirectory.create(tmp_path / "pki", "plant7")
    layout = pki.layout
    assert set(files) == {
        layout.ca.cert,
        layout.ca.key,
        layout.crl,
        layout.index,
        layout.aggregator_signing_key,
        layout.aggregator_public_key,
    }
    assert mode(layout.ca.key) == mode(layout.aggregator_signing_key) == 0o600
    assert mode(layout.ca.cert) == mode(layout.crl) == mode(layout.aggregator_public_key) == 0o644
    ca = read_cert(layout.ca.cert)
    ca.verify_directly_issued_by(ca)  # self-signed
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    key = read_key(layout.ca.key)
    assert isinstance(key.curve, ec.SECP256R1)
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3652)
    assert "plant7" in ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    crl = load_crl(pki)
    assert crl.is_signature_valid(key.public_key())
    assert len(crl) == 0
    signing = read_signing_key(layout.aggregator_signing_key)
    assert read_verify_key(layout.aggregator_public_key) == signing.public


def test_every_identity_gets_its_certificate(plant: Plant) -> None:
    pki = plant.pki
    for device in plant.devices:
        check_issued(pki, plant.identity(device), device, ExtendedKeyUsageOID.CLIENT_AUTH)
    check_issued(
        pki, plant.identity(plant.aggregator), plant.aggregator, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    check_issued(pki, plant.identity(plant.monitor), "monitor", ExtendedKeyUsageOID.CLIENT_AUTH)
    broker = check_issued(pki, pki.layout.broker, "localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    index = pki.index()
    assert [(e.cn, e.kind) for e in index.entries] == [
        ("press-a", Kind.device),
        ("press-b", Kind.device),
        (plant.aggregator, Kind.aggregator),
        ("monitor", Kind.monitor),
        ("localhost", Kind.broker),
    ]
    assert all(entry.revoked is None for entry in index.entries)


def test_keys_are_0600_whatever_the_umask(tmp_path: Path, permissive_umask: None) -> None:
    pki, _ = PkiDirectory.create(tmp_path / "pki", "plant7")
    issued = pki.device("press-a", federation="line-3", with_archive=True)
    bundle = pki.layout.bundle("press-a")
    assert mode(bundle.path(bundle.KEY)) == mode(bundle.path(bundle.SIGNING_KEY)) == 0o600
    assert mode(issued.extra["archive"]) == 0o600
    assert mode(bundle.directory) == 0o700
    assert mode(pki.layout.device_key("press-a")) == 0o644


def test_nothing_is_overwritten_without_force(plant: Plant) -> None:
    pki = plant.pki
    ca_before = pki.layout.ca.cert.read_bytes()
    with pytest.raises(ExistingFilesError, match=r"ca\.pem.*--force"):
        PkiDirectory.create(pki.root, "plant7")
    assert pki.layout.ca.cert.read_bytes() == ca_before

    bundle = pki.layout.bundle("press-a")
    cert_before = bundle.path(bundle.CERT).read_bytes()
    with pytest.raises(PkiError, match=r"already has a valid device certificate.*--force"):
        pki.device("press-a", federation=plant.topics.federation)
    assert bundle.path(bundle.CERT).read_bytes() == cert_before
    pki.layout.monitor("watcher").cert.write_bytes(b"someone else's file")
    with pytest.raises(ExistingFilesError, match=r"watcher\.pem already exists; pass --force"):
        pki.monitor("watcher")
    assert pki.layout.monitor("watcher").cert.read_bytes() == b"someone else's file"
    assert "watcher" not in {entry.cn for entry in pki.index().entries}


def test_force_reissues_and_revokes_what_it_replaces(plant: Plant) -> None:
    pki = plant.pki
    old = read_cert(plant.identity("press-a").cert)
    old_key = read_verify_key(pki.layout.device_key("press-a"))
    issued = pki.device("press-a", federation=plant.topics.federation, force=True)
    assert [entry.serial for entry in issued.superseded] == [old.serial_number]
    new = read_cert(plant.identity("press-a").cert)
    assert new.serial_number != old.serial_number
    assert load_crl(pki).get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert load_crl(pki).get_revoked_certificate_by_serial_number(new.serial_number) is None
    registered = read_verify_key(pki.layout.device_key("press-a"))
    bundle = pki.layout.bundle("press-a")
    assert registered != old_key
    assert read_signing_key(bundle.path(bundle.SIGNING_KEY)).public == registered
    assert [e.serial for e in pki.index().active("press-a")] == [new.serial_number]


def test_init_force_replaces_the_ca(plant: Plant) -> None:
    old = plant.pki.layout.ca.cert.read_bytes()
    pki, _ = PkiDirectory.create(plant.pki.root, "plant8", force=True)
    assert pki.layout.ca.cert.read_bytes() != old
    assert pki.index().entries == []


def test_one_name_is_one_kind_of_identity(plant: Plant) -> None:
    pki = plant.pki
    with pytest.raises(IdentityConflictError, match="'press-a' is already the name of a device"):
        pki.monitor("press-a")
    with pytest.raises(IdentityConflictError, match="aggregator"):
        pki.device(plant.aggregator, federation=plant.topics.federation)
    with pytest.raises(IdentityConflictError):
        pki.aggregator(plant.topics.federation, client_id="monitor")
    with pytest.raises(IdentityConflictError):
        pki.device("localhost", federation=plant.topics.federation)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda pki: pki.device("a/b", federation="f"), "device id 'a/b'"),
        (lambda pki: pki.device("#", federation="f"), "device id"),
        (lambda pki: pki.device("x" * 65, federation="f"), "over the limit of 64"),
        (lambda pki: pki.device("ok", federation="line 3"), "federation id"),
        (lambda pki: pki.device("ok", federation="f", topic_root="a/+"), "topic root"),
        (lambda pki: pki.device("ok", federation="f", broker_url="mqtt://b:1883"), "mqtts://"),
        (lambda pki: pki.aggregator("f", client_id="$agg"), "aggregator client id"),
        (lambda pki: pki.monitor(""), "monitor name"),
        (lambda pki: pki.broker([]), "at least one --host"),
        (lambda pki: pki.broker(["bad host"]), "neither an IP address nor a DNS name"),
        (lambda pki: pki.broker(["-x.example"]), "neither an IP address"),
        (lambda pki: pki.device("ok", federation="f", days=0), "--days"),
    ],
)
def test_bad_names_and_options_are_refused(tmp_path: Path, call: object, fragment: str) -> None:
    pki, _ = PkiDirectory.create(tmp_path / "pki", "plant7")
    with pytest.raises(ConfigError, match=fragment.replace("$", r"\$").replace("+", r"\+")):
        call(pki)  # type: ignore[operator]
    assert pki.index().entries == []


def test_a_bad_plant_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError, match="plant name"):
        PkiDirectory.create(tmp_path / "pki", "plant 7")
    assert not (tmp_path / "pki").exists()


def test_certificates_never_outlive_the_ca(tmp_path: Path) -> None:
    pki, _ = PkiDirectory.create(tmp_path / "pki", "plant7", days=30)
    pki.device("press-a", federation="f", days=3650)
    ca = read_cert(pki.layout.ca.cert)
    bundle = pki.layout.bundle("press-a")
    assert read_cert(bundle.path(bundle.CERT)).not_valid_after_utc == ca.not_valid_after_utc


def test_a_directory_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(PkiNotFoundError, match="fedmq pki init"):
        PkiDirectory.open(tmp_path / "nothing")


def test_a_second_command_on_the_same_directory_is_refused(plant: Plant) -> None:
    fd = lock_directory(plant.pki.root)
    try:
        with pytest.raises(PkiBusyError, match="another fedmq pki command"):
            plant.pki.monitor("second")
    finally:
        os.close(fd)


# ------------------------------------------------------------------ revocation


def test_revoke_lists_the_serial_in_the_crl_and_unregisters_the_device(plant: Plant) -> None:
    pki = plant.pki
    serial = read_cert(plant.identity("press-a").cert).serial_number
    revoked = pki.revoke("press-a")
    assert [entry.serial for entry in revoked.entries] == [serial]
    assert revoked.unregistered == pki.layout.device_key("press-a")
    assert not pki.layout.device_key("press-a").exists()
    assert pki.layout.device_key("press-b").exists()
    crl = load_crl(pki)
    assert crl.is_signature_valid(read_key(pki.layout.ca.key).public_key())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert len(crl) == 1
    (entry,) = [e for e in pki.index().entries if e.serial == serial]
    assert entry.revoked is not None
    assert mode(pki.layout.crl) == 0o644


def test_every_revocation_makes_a_strictly_newer_crl(plant: Plant) -> None:
    pki = plant.pki
    now = dt.datetime.now(dt.UTC)
    first = load_crl(pki)
    pki.revoke("press-a", now=now)
    second = load_crl(pki)
    pki.revoke("monitor", now=now)  # the same second: still strictly newer
    third = load_crl(pki)
    updates = [crl.last_update_utc for crl in (first, second, third)]
    assert updates == sorted(set(updates))
    numbers = [
        crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        for crl in (first, second, third)
    ]
    assert numbers == [1, 2, 3]
    # Backdated for clock skew: a broker whose clock lags must not see a future CRL.
    assert third.last_update_utc < now
    assert third.next_update_utc == read_cert(pki.layout.ca.cert).not_valid_after_utc
    assert len(third) == 2


def test_revoking_twice_or_an_unknown_name_is_refused(plant: Plant) -> None:
    plant.pki.revoke("press-a")
    with pytest.raises(UnknownIdentityError, match="revoked already"):
        plant.pki.revoke("press-a")
    with pytest.raises(UnknownIdentityError, match="no certificate was issued to 'press-z'"):
        plant.pki.revoke("press-z")
