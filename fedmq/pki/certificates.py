"""X.509 building blocks: keys, PEM files and the certificate profiles fedmq issues.

Every key is EC P-256 (small, fast on device CPUs, supported by every TLS stack a
broker or device runs) and written unencrypted as PKCS#8 PEM: the services start
unattended under systemd, and the files are 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq.pki.errors import CorruptPkiError

# Certificates start this long before "now": a device or broker whose clock lags the
# operator's workstation would otherwise reject a fresh certificate as not yet valid.
CLOCK_SKEW = dt.timedelta(hours=1)
SIGNATURE_HASH = hashes.SHA256()


class Kind(StrEnum):
    """What an identity is for; decides the certificate profile and the ACL role."""

    device = "device"
    aggregator = "aggregator"
    monitor = "monitor"
    broker = "broker"


Host = x509.DNSName | x509.IPAddress


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM form of ``key`` (write it 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """The PEM form of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def read_cert(path: Path) -> x509.Certificate:
    """Load a PEM certificate.

    Raises:
        CorruptPkiError: unreadable or not a PEM certificate; names the file.
    """
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CorruptPkiError(f"cannot read the certificate {path}: {exc}") from exc


def read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM private key written by :func:`key_pem`.

    Raises:
        CorruptPkiError: unreadable, encrypted, or not an EC key; names the file.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CorruptPkiError(f"cannot read the private key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CorruptPkiError(f"{path} is not an EC private key")
    return key


def common_name(cert: x509.Certificate) -> str:
    """The subject CN of ``cert`` (the MQTT identity, for fedmq's certificates)."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return ""
    value = values[0].value
    return value if isinstance(value, str) else value.decode()


def _name(cn: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def ca_certificate(
    key: ec.EllipticCurvePrivateKey, plant: str, now: dt.datetime, days: int
) -> x509.Certificate:
    """The self-signed plant CA: CA:true, pathlen 0 (it signs leaves, never other CAs)."""
    name = _name(f"{plant} fedmq plant CA", plant)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, SIGNATURE_HASH)
    )


def parse_hosts(hosts: Sequence[str]) -> list[Host]:
    """Subject alternative names for the broker: IP addresses as such, the rest as DNS names.

    Raises:
        ValueError: a name that is neither an IP address nor a DNS name.
    """
    names: list[Host] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.removeprefix("*.").split(".")
        if not host or len(host) > 253 or not all(_dns_label(label) for label in labels):
            raise ValueError(f"{host!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(host.lower()))
    return list(dict.fromkeys(names))


def _dns_label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and label.isascii()
        and all(c.isalnum() or c == "-" for c in label)
        and not label.startswith("-")
        and not label.endswith("-")
    )


def leaf_certificate(
    *,
    cn: str,
    kind: Kind,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int,
    now: dt.datetime,
    not_after: dt.datetime,
    hosts: Sequence[Host] = (),
) -> x509.Certificate:
    """A certificate the plant CA issues: a client (devices, aggregator, monitor) or the broker.

    Clients get only the clientAuth purpose and the broker only serverAuth, so a
    stolen broker key cannot log in as a client and a device cannot pose as the broker.
    """
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if kind is Kind.broker else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,  # ECDHE-ECDSA handshakes sign with the key
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(hosts)), critical=False)
    return builder.sign(issuer_key, SIGNATURE_HASH)
