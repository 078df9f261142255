"""Key material for security tests: an aggregator key, device keys, a device registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedmq.wire.signing import SigningKey


@dataclass
class Keys:
    """Keys written under ``root`` the way ``fedmq pki`` lays them out for one federation."""

    root: Path
    aggregator: SigningKey = field(default_factory=SigningKey.generate)
    devices: dict[str, SigningKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.registry.mkdir(parents=True, exist_ok=True)
        self.aggregator_secret.write_text(self.aggregator.text() + "\n")
        self.aggregator_public.write_text(self.aggregator.public.text() + "\n")

    @property
    def registry(self) -> Path:
        return self.root / "devices"

    @property
    def aggregator_secret(self) -> Path:
        return self.root / "aggregator.sign"

    @property
    def aggregator_public(self) -> Path:
        return self.root / "aggregator.pub"

    def device(self, client: str, *, register: bool = True) -> SigningKey:
        """A device key (written to ``<client>.sign``), registered unless told otherwise."""
        key = self.devices.get(client) or SigningKey.generate()
        self.devices[client] = key
        (self.root / f"{client}.sign").write_text(key.text() + "\n")
        if register:
            (self.registry / f"{client}.pub").write_text(key.public.text() + "\n")
        return key

    def agent_security(self, client: str) -> dict[str, object]:
        """The ``[security]`` table of ``client``'s agent.toml."""
        self.device(client)
        return {
            "aggregator_keys": [str(self.aggregator_public)],
            "signing_key": str(self.root / f"{client}.sign"),
        }

    def aggregator_security(self) -> dict[str, str]:
        """The ``[security]`` table of federation.toml."""
        return {"signing_key": str(self.aggregator_secret), "devices": str(self.registry)}
