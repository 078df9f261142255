"""A device's provisioning bundle: its keys, the trust anchors and a filled-in agent.toml.

The bundle is copied onto the device (by hand, or by a provisioning script unpacking
``<id>.tar.gz`` into the install directory, ``/etc/fedmq`` by default), so
``agent.toml`` names its files under that directory.  With ``install_dir="."`` the
paths are relative, and agent.toml resolves them against its own location: the bundle
then works where it lies.
"""

from __future__ import annotations

import io
import json
import string
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from fedmq.pki.errors import PkiError
from fedmq.pki.layout import BundleFiles

DEFAULT_INSTALL_DIR = "/etc/fedmq"
DEFAULT_STATE_DIR = "/var/lib/fedmq-agent"
DEFAULT_BROKER_URL = "mqtts://broker.plant.local:8883"
ARCHIVE_FILE_MODE = 0o600  # the archive carries the device's private keys
ARCHIVE_DIR_MODE = 0o700

# deploy/agent.toml (the documented sample), with this device's values and files.
AGENT_TOML = string.Template("""\
# fedmq edge agent configuration of device ${client_id}: ${install_dir_text}/agent.toml
# Written by `fedmq pki device` with the rest of this bundle.  Reference: docs/agent.md.
# Any key can be overridden by an environment variable FEDMQ_AGENT_<KEY>
# (nested: FEDMQ_AGENT_BROKER__URL); the environment wins.

client_id = ${client_id_toml}   # this device: MQTT client id, certificate CN, topic level
federation = ${federation}      # the federation (one aggregator) this device trains for
topic_root = ${topic_root}
state_dir = ${state_dir}   # outbox, blob cache, residuals; systemd StateDirectory=
threads = 1                     # onnxruntime threads; 1 leaves a core to the plant software
heartbeat_s = 10
log_level = "INFO"

[broker]
url = ${broker_url}
ca_file = ${ca_file}           # the plant CA: it signed the broker's certificate
cert_file = ${cert_file}     # this device's certificate (CN = client_id)
key_file = ${key_file}
protocol = "5"
keepalive_s = 30

[security]
# The aggregator's public signing key: control messages not signed by it are ignored.
aggregator_keys = [${aggregator_key}]
signing_key = ${signing_key}   # this device's update signing key (registered by the aggregator)

[data]
path = ${data_path}      # *.npz or *.csv; optional eval/ subdirectory
# entry_point = "plant_data.loader:load" # or a Python function returning arrays
format = "auto"
target = "label"                        # "input" for autoencoders
label_column = "label"                  # CSV column holding the label
eval_fraction = 0.2
seed = 0

# [limits] and [outbox] keep their defaults: see docs/agent.md.
""")


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(value, ensure_ascii=True)


def check_broker_url(url: str) -> str:
    """Return ``url`` if a device can use it with its certificate.

    Raises:
        PkiError: not ``mqtts://host[:port]`` (a client certificate needs TLS).
    """
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme != "mqtts" or not parts.hostname or not port_ok:
        raise PkiError(
            f"--broker-url {url!r} must look like mqtts://host[:port]: the certificate "
            "is only presented over TLS"
        )
    return url


@dataclass(frozen=True)
class AgentConfigValues:
    """What the bundle's agent.toml says besides the file names."""

    client_id: str
    federation: str
    topic_root: str = "fedmq"
    broker_url: str = DEFAULT_BROKER_URL
    install_dir: str = DEFAULT_INSTALL_DIR
    state_dir: str = DEFAULT_STATE_DIR


def agent_toml(values: AgentConfigValues) -> str:
    """The text of the bundle's agent.toml."""
    base = PurePosixPath(values.install_dir)

    def installed(name: str) -> str:
        return toml_string(str(base / name))

    return AGENT_TOML.substitute(
        client_id=values.client_id,
        client_id_toml=toml_string(values.client_id),
        install_dir_text=str(base),
        federation=toml_string(values.federation),
        topic_root=toml_string(values.topic_root),
        state_dir=toml_string(values.state_dir),
        broker_url=toml_string(check_broker_url(values.broker_url)),
        ca_file=installed(BundleFiles.CA),
        cert_file=installed(BundleFiles.CERT),
        key_file=installed(BundleFiles.KEY),
        aggregator_key=installed(BundleFiles.AGGREGATOR_KEY),
        signing_key=installed(BundleFiles.SIGNING_KEY),
        data_path=toml_string(str(PurePosixPath(values.state_dir) / "data")),
    )


def archive(files: Mapping[str, bytes], top: str, now: float | None = None) -> bytes:
    """The bundle ``files`` (by name) as a ``.tar.gz`` of ``<top>/<name>``, all 0600.

    No absolute paths, so unpacking never writes outside the target directory.

    Owners are zeroed (``root``): the provisioning script decides who owns the files.
    """
    mtime = time.time() if now is None else now
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        directory = tarfile.TarInfo(top)
        directory.type = tarfile.DIRTYPE
        directory.mode = ARCHIVE_DIR_MODE
        directory.mtime = int(mtime)
        tar.addfile(directory)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mode = ARCHIVE_FILE_MODE
            info.mtime = int(mtime)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
