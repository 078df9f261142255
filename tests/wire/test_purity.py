"""The wire protocol stays sans-IO: importing it pulls in no event loop, broker or runtime."""

import subprocess
import sys

FORBIDDEN = ("asyncio", "aiomqtt", "paho", "onnxruntime", "torch")


def test_wire_imports_no_io_or_runtime() -> None:
    code = (
        "import sys, pkgutil, importlib, fedmq.wire\n"
        "for info in pkgutil.walk_packages(fedmq.wire.__path__, 'fedmq.wire.'):\n"
        "    importlib.import_module(info.name)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
