"""Where everything lives in a PKI directory (``fedmq pki --dir``, default ``./pki``).

::

    <dir>/
      ca.pem  ca.key                 the plant CA (key 0600)
      crl.pem                        revoked serials, signed by the CA (Mosquitto crlfile)
      index.json                     every certificate issued: serial, CN, kind, expiry, revoked
      certs/<serial>.pem             a copy of each issued certificate
      aggregator/aggregator.sign     the aggregator's Ed25519 signing key (0600) ...
      aggregator/aggregator.pub      ... and its public half, pinned by every agent
      aggregator/<CN>.pem  <CN>.key  the aggregator's client certificate per federation
      aggregator/federation-security-<federation>.toml   lines for federation.toml
      devices/<id>.pub               the device registry: update signing keys it accepts
      bundles/<id>/                  a device's provisioning bundle (secrets: 0700/0600)
      bundles/<id>.tar.gz            the same as one archive (--archive)
      monitor/<name>.pem  <name>.key a read-only monitor identity
      broker/broker.pem  broker.key  the broker's server certificate
      mosquitto/acl                  the generated Mosquitto acl_file
      mosquitto/mosquitto.conf       the rendered production broker configuration
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INDEX_FILE = "index.json"


@dataclass(frozen=True)
class CertPaths:
    """A certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class BundleFiles:
    """The files of one device's provisioning bundle, by their fixed names."""

    directory: Path

    CA = "ca.pem"
    CERT = "device.pem"
    KEY = "device.key"
    SIGNING_KEY = "device.sign"
    AGGREGATOR_KEY = "aggregator.pub"
    AGENT_CONFIG = "agent.toml"
    NAMES = (CA, CERT, KEY, SIGNING_KEY, AGGREGATOR_KEY, AGENT_CONFIG)

    def path(self, name: str) -> Path:
        """The bundle file called ``name``."""
        return self.directory / name


@dataclass(frozen=True)
class PkiLayout:
    """File names of one PKI directory; nothing here touches the disk."""

    root: Path

    @property
    def ca(self) -> CertPaths:
        """The plant CA certificate and key."""
        return CertPaths(self.root / "ca.pem", self.root / "ca.key")

    @property
    def crl(self) -> Path:
        """The certificate revocation list."""
        return self.root / "crl.pem"

    @property
    def index(self) -> Path:
        """The index of issued certificates."""
        return self.root / INDEX_FILE

    def issued_copy(self, serial: int) -> Path:
        """Where the copy of certificate ``serial`` is kept."""
        return self.root / "certs" / f"{serial:x}.pem"

    @property
    def aggregator_dir(self) -> Path:
        """The aggregator's keys and certificates."""
        return self.root / "aggregator"

    @property
    def aggregator_signing_key(self) -> Path:
        """The aggregator's Ed25519 secret key."""
        return self.aggregator_dir / "aggregator.sign"

    @property
    def aggregator_public_key(self) -> Path:
        """The aggregator's Ed25519 public key (what agents pin)."""
        return self.aggregator_dir / "aggregator.pub"

    def aggregator(self, client_id: str) -> CertPaths:
        """The client certificate of the aggregator whose MQTT client id is ``client_id``."""
        return CertPaths(
            self.aggregator_dir / f"{client_id}.pem", self.aggregator_dir / f"{client_id}.key"
        )

    def federation_snippet(self, federation: str) -> Path:
        """The ``[broker]``/``[security]`` lines for ``federation``'s federation.toml."""
        return self.aggregator_dir / f"federation-security-{federation}.toml"

    @property
    def devices(self) -> Path:
        """The device registry: one ``<id>.pub`` per device whose updates are accepted."""
        return self.root / "devices"

    def device_key(self, device_id: str) -> Path:
        """The registered public signing key of ``device_id``."""
        return self.devices / f"{device_id}.pub"

    def bundle(self, device_id: str) -> BundleFiles:
        """The provisioning bundle directory of ``device_id``."""
        return BundleFiles(self.root / "bundles" / device_id)

    def bundle_archive(self, device_id: str) -> Path:
        """The provisioning bundle of ``device_id`` as one ``.tar.gz``."""
        return self.root / "bundles" / f"{device_id}.tar.gz"

    def monitor(self, name: str) -> CertPaths:
        """The certificate of monitor ``name``."""
        return CertPaths(
            self.root / "monitor" / f"{name}.pem", self.root / "monitor" / f"{name}.key"
        )

    @property
    def broker(self) -> CertPaths:
        """The broker's server certificate."""
        return CertPaths(self.root / "broker" / "broker.pem", self.root / "broker" / "broker.key")

    @property
    def acl(self) -> Path:
        """The generated Mosquitto ACL file."""
        return self.root / "mosquitto" / "acl"

    @property
    def broker_config(self) -> Path:
        """The rendered production Mosquitto configuration."""
        return self.root / "mosquitto" / "mosquitto.conf"
