"""The device runtime never imports torch (nor onnx): a device does not have them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fedmq.bundle import Bundle
    from fedmq.runtime import Trainer
    from fedmq.wire.training import TrainingConfig

    bundle = Bundle.load(sys.argv[1])
    trainer = Trainer(bundle)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    result = trainer.train(bundle.initial_parameters(), x, y, TrainingConfig(epochs=2))
    trainer.evaluate(bundle.initial_parameters(), x, y)
    assert result.metrics["steps"] == 4
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "onnx", "onnxscript"})
    print("LEAKED", leaked)
    """
)


def test_training_a_bundle_never_imports_torch(bundles_dir: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(bundles_dir / "digits_cnn")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "LEAKED []" in completed.stdout


def test_bundle_format_and_training_config_are_pure() -> None:
    """fedmq.bundle and fedmq.wire.training load without onnxruntime (aggregators use them)."""
    code = (
        "import sys, fedmq.bundle, fedmq.wire.training\n"
        "heavy = {'torch', 'onnxruntime', 'onnx'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "[]"
