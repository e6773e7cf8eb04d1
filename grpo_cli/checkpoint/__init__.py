"""Checkpoints on disk: layout.py (what one holds and where), manifest.py (its records, and what makes one
complete), verification.py (its contents checked before loading), store.py (saving and restoring a run's state),
retention.py (the best marker and pruning), locating.py (the checkpoint a command means)."""
