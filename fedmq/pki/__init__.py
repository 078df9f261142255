"""The plant's PKI: the CA, device and service certificates, the CRL and the broker's ACL.

``fedmq pki`` (:mod:`fedmq.cli.pki_cmd`) is the command line; this package does the
work and imports no event loop.  Identities and what the broker lets them do:

* the **plant CA** (``pki init``) signs every certificate and the CRL;
* a **device** (``pki device ID``): a client certificate with CN = its MQTT client id,
  an Ed25519 update signing key registered in ``devices/<ID>.pub``, and a provisioning
  bundle with a filled-in ``agent.toml``;
* the **aggregator** (``pki aggregator``): a client certificate with CN =
  ``fedmq-aggregator-<federation>``; its Ed25519 signing key (made by ``pki init``) is
  the one every agent pins;
* a **monitor** (``pki monitor``): read-only client certificate;
* the **broker** (``pki broker``): a server certificate for its host names.

The Mosquitto ACL (:mod:`fedmq.pki.acl`) is generated from the topic scheme.  The
directory layout is in :mod:`fedmq.pki.layout`; issuing a certificate, and the files
each kind of identity gets with it, in :mod:`fedmq.pki.issuing`.
"""

from fedmq.pki.acl import AclFile, federation_acl
from fedmq.pki.certificates import Kind
from fedmq.pki.directory import DEFAULT_DIR, PkiDirectory, Revoked, aggregator_client_id
from fedmq.pki.errors import (
    CorruptPkiError,
    ExistingFilesError,
    IdentityConflictError,
    InvalidNameError,
    PkiBusyError,
    PkiError,
    PkiNotFoundError,
    UnknownIdentityError,
)
from fedmq.pki.issuing import Issued
from fedmq.pki.layout import PkiLayout

__all__ = [
    "DEFAULT_DIR",
    "AclFile",
    "CorruptPkiError",
    "ExistingFilesError",
    "IdentityConflictError",
    "InvalidNameError",
    "Issued",
    "Kind",
    "PkiBusyError",
    "PkiDirectory",
    "PkiError",
    "PkiLayout",
    "PkiNotFoundError",
    "Revoked",
    "UnknownIdentityError",
    "aggregator_client_id",
    "federation_acl",
]
