"""``fedmq`` on an install without the server extra names the extra instead of crashing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedmq import exit_codes


def run_fedmq(*args: str, blocked: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``fedmq`` entry point, as if the ``blocked`` package were not installed."""
    code = "import sys\n"
    if blocked is not None:
        code += f"sys.modules[{blocked!r}] = None  # importing it now fails\n"
    code += "from fedmq.cli.app import main\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("missing", ["typer", "rich", "prometheus_client"])
def test_fedmq_without_the_server_extra_says_what_to_install(missing: str) -> None:
    result = run_fedmq("--help", blocked=missing)
    assert result.returncode == exit_codes.CONFIG_ERROR, result.stderr
    assert "pip install 'fedmq[server]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_fedmq_with_the_server_extra_runs_the_commands() -> None:
    result = run_fedmq("--help")
    assert result.returncode == exit_codes.OK, result.stderr
    assert "serve" in result.stdout
