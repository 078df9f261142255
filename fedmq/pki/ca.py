"""The plant CA: one self-signed EC key that signs every certificate and the CRL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmq.pki.certificates import (
    Host,
    Kind,
    ca_certificate,
    leaf_certificate,
    new_key,
    read_cert,
    read_key,
)
from fedmq.pki.crl import build_crl, next_last_update
from fedmq.pki.errors import CorruptPkiError, PkiError
from fedmq.pki.index import Index, IndexEntry
from fedmq.pki.layout import CertPaths

CA_DAYS = 3650  # ten years: re-keying a plant means re-provisioning every device


@dataclass(frozen=True)
class CertificateAuthority:
    """The plant CA's certificate and private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, plant: str, now: dt.datetime, days: int = CA_DAYS) -> CertificateAuthority:
        """A new CA for ``plant``, valid ``days`` days."""
        key = new_key()
        return cls(ca_certificate(key, plant, now, days), key)

    @classmethod
    def load(cls, paths: CertPaths) -> CertificateAuthority:
        """Read the CA from its files.

        Raises:
            CorruptPkiError: a file is unreadable, or the key is not the certificate's.
        """
        cert, key = read_cert(paths.cert), read_key(paths.key)
        if cert.public_key() != key.public_key():
            raise CorruptPkiError(f"{paths.key} is not the private key of {paths.cert}")
        return cls(cert, key)

    @property
    def not_after(self) -> dt.datetime:
        """When the CA (and with it every certificate it issued) expires."""
        return self.cert.not_valid_after_utc

    def issue(
        self,
        *,
        cn: str,
        kind: Kind,
        public_key: ec.EllipticCurvePublicKey,
        now: dt.datetime,
        days: int,
        hosts: Sequence[Host] = (),
    ) -> x509.Certificate:
        """Sign a leaf certificate; it never outlives the CA.

        Raises:
            PkiError: ``days`` is not positive, or the CA has expired.
        """
        if days < 1:
            raise PkiError(f"--days must be at least 1, not {days}")
        if self.not_after <= now:
            raise PkiError(f"the plant CA expired on {self.not_after:%Y-%m-%d}; run pki init again")
        not_after = min(now + dt.timedelta(days=days), self.not_after)
        return leaf_certificate(
            cn=cn,
            kind=kind,
            public_key=public_key,
            issuer=self.cert,
            issuer_key=self.key,
            serial=x509.random_serial_number(),
            now=now,
            not_after=not_after,
            hosts=hosts,
        )

    def crl(
        self, revoked: Iterable[IndexEntry], *, number: int, last_update: dt.datetime
    ) -> x509.CertificateRevocationList:
        """A CRL of ``revoked``, signed by this CA."""
        return build_crl(self.cert, self.key, revoked, number=number, last_update=last_update)

    def next_crl(self, index: Index, now: dt.datetime) -> bytes:
        """The PEM CRL of ``index``'s revoked certificates, numbered after the last one.

        Bumps the index's CRL number and time, so save the index before writing the file:
        a CRL on disk must never be newer than the index that numbered it.
        """
        index.crl_number += 1
        index.crl_last_update = next_last_update(index.crl_last_update, now)
        crl = self.crl(index.revoked(), number=index.crl_number, last_update=index.crl_last_update)
        return crl.public_bytes(serialization.Encoding.PEM)
