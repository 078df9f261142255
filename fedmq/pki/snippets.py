"""The lines an operator pastes into ``federation.toml`` for the aggregator's identity."""

from __future__ import annotations

from pathlib import Path

from fedmq.pki.bundle import toml_string
from fedmq.pki.layout import PkiLayout


def security_lines(layout: PkiLayout) -> str:
    """``[security]`` of federation.toml: the aggregator's signing key and device registry."""
    return (
        "[security]\n"
        f"signing_key = {toml_string(str(_absolute(layout.aggregator_signing_key)))}\n"
        f"devices = {toml_string(str(_absolute(layout.devices)))}"
        "   # accepts updates only from devices registered here\n"
    )


def broker_lines(layout: PkiLayout, client_id: str, broker_url: str) -> str:
    """``[broker]`` of federation.toml: the broker and the aggregator's client certificate."""
    paths = layout.aggregator(client_id)
    return (
        "[broker]\n"
        f"url = {toml_string(broker_url)}\n"
        f"client_id = {toml_string(client_id)}   # = the certificate CN\n"
        f"ca_file = {toml_string(str(_absolute(layout.ca.cert)))}\n"
        f"cert_file = {toml_string(str(_absolute(paths.cert)))}\n"
        f"key_file = {toml_string(str(_absolute(paths.key)))}\n"
    )


def federation_snippet(layout: PkiLayout, federation: str, client_id: str, broker_url: str) -> str:
    """Both tables, as the ``federation-security-<federation>.toml`` file."""
    return (
        f"# federation.toml lines of the aggregator of {federation!r}, written by\n"
        "# `fedmq pki aggregator`: paste them into its [broker] and [security] tables.\n\n"
        + broker_lines(layout, client_id, broker_url)
        + "\n"
        + security_lines(layout)
    )


def _absolute(path: Path) -> Path:
    # The aggregator resolves relative paths against federation.toml, which is rarely
    # beside the PKI directory; absolute paths survive the paste.
    return path.absolute()
