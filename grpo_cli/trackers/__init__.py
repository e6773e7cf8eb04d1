"""Where a run's metrics and samples go besides its JSONL files: the metric-sink protocol and registry, and the
trackers grpo ships (TensorBoard, W&B, MLflow, Trackio), one module each."""
