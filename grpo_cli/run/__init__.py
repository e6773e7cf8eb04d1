"""A training run: the loop and its phases, the run directory, logs, metrics, checkpoints' schedule, the console."""
