"""Command-line options naming a broker connection, shared by the commands that connect.

``fedmq clear`` and ``fedmq monitor`` take the same TLS and credential options, so an
operator types them the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

CaFileOption = Annotated[
    Path | None, typer.Option("--ca-file", help="CA bundle verifying the broker (mqtts)")
]
CertFileOption = Annotated[
    Path | None, typer.Option("--cert-file", help="client certificate (mTLS, fedmq pki)")
]
KeyFileOption = Annotated[Path | None, typer.Option("--key-file", help="its private key")]
UsernameOption = Annotated[str | None, typer.Option("--username", help="broker username")]
PasswordOption = Annotated[
    str | None,
    typer.Option("--password", envvar="FEDMQ_BROKER__PASSWORD", help="broker password"),
]
ClientIdOption = Annotated[
    str | None, typer.Option("--client-id", help="MQTT client id (default: random)")
]
