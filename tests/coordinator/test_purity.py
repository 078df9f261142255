"""The coordinator and the strategies stay sans-IO: no event loop, broker or runtime."""

import subprocess
import sys

import pytest

FORBIDDEN = ("asyncio", "aiomqtt", "paho", "onnxruntime", "torch")


@pytest.mark.parametrize("package", ["fedmq.coordinator", "fedmq.strategies"])
def test_package_imports_no_io_or_runtime(package: str) -> None:
    code = (
        f"import sys, pkgutil, importlib, {package} as pkg\n"
        f"for info in pkgutil.walk_packages(pkg.__path__, '{package}.'):\n"
        "    importlib.import_module(info.name)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
