"""The agent install stays lean: importing it pulls in no server or training-framework package."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = (
    "torch",
    "sklearn",
    "scipy",
    "typer",
    "rich",
    "prometheus_client",
    "cryptography",
    "onnx",
    "onnxscript",
    "fedmq.cli",
    "fedmq.compile",
    "fedmq.strategies",
    "fedmq.datasets",
)


def test_agent_imports_no_server_packages() -> None:
    code = (
        "import sys, pkgutil, importlib, edge_agent\n"
        "for info in pkgutil.walk_packages(edge_agent.__path__, 'edge_agent.'):\n"
        "    if info.name != 'edge_agent.__main__':\n"
        "        importlib.import_module(info.name)\n"
        "assert 'onnxruntime' in sys.modules  # the runtime really is loaded\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
