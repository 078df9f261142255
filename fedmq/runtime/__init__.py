"""On-device training with onnxruntime and numpy only (never imports torch)."""
