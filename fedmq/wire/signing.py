"""Ed25519 signatures: key files, signed control messages, device update statements.

The aggregator signs every control message an agent acts on (announcements, acks,
resend requests); agents pin its public key.  Devices sign a short statement naming
each update they upload (federation, client, round, update id, sha256, size), so the
aggregator accepts an update only when the broker-authenticated topic id and the
device's registered key agree.

Library: PyNaCl (libsodium), the smallest well-kept package with Ed25519 (a 1.4 MB
wheel, against 4.7 MB for ``cryptography``, which only the server's ``fedmq pki`` needs
for X.509).

Key files are one line of text, so they survive copy-paste and config management::

    fedmq-ed25519-secret:<base64 of the 32-byte seed>
    fedmq-ed25519-public:<base64 of the 32-byte public key>

``#`` comment lines and blank lines are ignored.  A key is named by its *key id*: the
first 16 hex digits of the sha256 of the public key.

What is signed for a control message is ``fedmq-control-v1`` and a newline, followed by the
canonical JSON of the message without its ``signature`` field (sorted keys, no
whitespace, ASCII).  The signature field reads ``ed25519:<key id>:<base64 signature>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing

from fedmq.errors import ConfigError, RemoteProtocolError

SECRET_PREFIX = "fedmq-ed25519-secret:"
PUBLIC_PREFIX = "fedmq-ed25519-public:"
SIGNATURE_SCHEME = "ed25519"
SIGNATURE_FIELD = "signature"
SIGNATURE_BYTES = 64
KEY_BYTES = 32
CONTROL_CONTEXT = b"fedmq-control-v1\n"
UPDATE_CONTEXT = b"fedmq-update-v1\n"


class SignatureError(RemoteProtocolError):
    """A message is unsigned, signed by a key we do not trust, or its signature is wrong."""


class UnsignedMessageError(SignatureError):
    """A message that must be signed carries no signature."""


class UnknownKeyError(SignatureError):
    """The signature names a key id we do not trust."""


class BadSignatureError(SignatureError):
    """The signature does not verify: the message was altered or forged."""


class ReplayedMessageError(SignatureError):
    """A validly signed message older than one already seen: a replay."""


def key_id(public: bytes) -> str:
    """The short name of a public key: 16 hex digits of its sha256."""
    return hashlib.sha256(public).hexdigest()[:16]


@dataclass(frozen=True)
class VerifyKey:
    """A trusted Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_BYTES:
            raise ConfigError(f"an Ed25519 public key is {KEY_BYTES} bytes, not {len(self.raw)}")

    @property
    def id(self) -> str:
        """This key's key id."""
        return key_id(self.raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is this key's signature of ``message``."""
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True

    def text(self) -> str:
        """The one-line key file form."""
        return PUBLIC_PREFIX + base64.b64encode(self.raw).decode()


class SigningKey:
    """An Ed25519 private key (the aggregator's, or a device's)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_BYTES:
            raise ConfigError(f"an Ed25519 secret key is {KEY_BYTES} bytes, not {len(seed)}")
        self._key = nacl.signing.SigningKey(seed)
        self.public = VerifyKey(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def id(self) -> str:
        """The key id of the public half."""
        return self.public.id

    def sign(self, message: bytes) -> bytes:
        """The 64-byte signature of ``message``."""
        return bytes(self._key.sign(message).signature)

    def text(self) -> str:
        """The one-line key file form (secret: write it 0600)."""
        return SECRET_PREFIX + base64.b64encode(bytes(self._key)).decode()

    def __repr__(self) -> str:
        return f"SigningKey(id={self.id})"


def _key_line(text: str, prefix: str, what: str) -> bytes:
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) != 1 or not lines[0].startswith(prefix):
        raise ConfigError(f"{what} must be one line starting with {prefix!r}")
    try:
        raw = base64.b64decode(lines[0][len(prefix) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what} is not valid base64: {exc}") from exc
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{what} holds {len(raw)} bytes, an Ed25519 key has {KEY_BYTES}")
    return raw


def parse_signing_key(text: str, source: str = "signing key") -> SigningKey:
    """Parse a secret key file's text.

    Raises:
        ConfigError: not a fedmq secret key (a public key given instead, say).
    """
    return SigningKey(_key_line(text, SECRET_PREFIX, source))


def parse_verify_key(text: str, source: str = "public key") -> VerifyKey:
    """Parse a public key file's text.

    Raises:
        ConfigError: not a fedmq public key.
    """
    return VerifyKey(_key_line(text, PUBLIC_PREFIX, source))


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc}") from exc


def read_signing_key(path: Path) -> SigningKey:
    """Load a secret key file (``fedmq pki`` writes them).

    Raises:
        ConfigError: unreadable or not a secret key; the message names the file.
    """
    return parse_signing_key(_read(path, "signing key"), f"signing key {str(path)!r}")


def read_verify_key(path: Path) -> VerifyKey:
    """Load a public key file.

    Raises:
        ConfigError: unreadable or not a public key; the message names the file.
    """
    return parse_verify_key(_read(path, "public key"), f"public key {str(path)!r}")


class TrustedKeys:
    """The public keys a verifier accepts, by key id (several during a key rotation)."""

    def __init__(self, keys: Iterable[VerifyKey]) -> None:
        self._keys = {key.id: key for key in keys}
        if not self._keys:
            raise ConfigError("no trusted public key given")

    @property
    def ids(self) -> tuple[str, ...]:
        """The trusted key ids, sorted."""
        return tuple(sorted(self._keys))

    def get(self, kid: str) -> VerifyKey | None:
        """The key named ``kid``, if trusted."""
        return self._keys.get(kid)


# -- control messages ---------------------------------------------------------------


def _canonical(document: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadSignatureError(f"message cannot be canonicalised: {exc}") from exc
    return CONTROL_CONTEXT + text.encode("ascii")


def control_signature(document: Mapping[str, Any], key: SigningKey) -> str:
    """The ``signature`` field value for a control message's JSON ``document``."""
    signature = key.sign(_canonical(document))
    return f"{SIGNATURE_SCHEME}:{key.id}:{base64.b64encode(signature).decode()}"


def _split_signature(value: object) -> tuple[str, bytes]:
    if not isinstance(value, str):
        raise BadSignatureError(f"signature must be a string, got {type(value).__name__}")
    scheme, _, rest = value.partition(":")
    kid, _, encoded = rest.partition(":")
    if scheme != SIGNATURE_SCHEME or not kid or not encoded:
        raise BadSignatureError(f"signature must read '{SIGNATURE_SCHEME}:<key id>:<base64>'")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise BadSignatureError(f"signature is not valid base64: {exc}") from exc
    if len(raw) != SIGNATURE_BYTES:
        raise BadSignatureError(f"signature holds {len(raw)} bytes, not {SIGNATURE_BYTES}")
    return kid, raw


def verify_control(document: Mapping[str, Any], trusted: TrustedKeys) -> str:
    """Check a parsed control message's signature; return the signing key id.

    Raises:
        UnsignedMessageError: there is no signature.
        UnknownKeyError: it names a key that is not trusted.
        BadSignatureError: it is malformed or does not verify.
    """
    value = document.get(SIGNATURE_FIELD)
    if value is None:
        raise UnsignedMessageError(f"{document.get('type', 'control')} message is not signed")
    kid, raw = _split_signature(value)
    key = trusted.get(kid)
    if key is None:
        raise UnknownKeyError(
            f"signed by key {kid!r}, not a trusted aggregator key ({', '.join(trusted.ids)})"
        )
    if not key.verify(_canonical(document), raw):
        raise BadSignatureError(f"signature by key {kid} does not verify: message altered")
    return kid


# -- device updates -----------------------------------------------------------------


def update_statement(
    federation: str, client: str, round_id: int, update_id: str, sha256: bytes, size: int
) -> bytes:
    """What a device signs for one update: every field the aggregator counts it by."""
    fields = (federation, client, str(round_id), update_id, sha256.hex(), str(size))
    return UPDATE_CONTEXT + "\n".join(fields).encode("ascii")
