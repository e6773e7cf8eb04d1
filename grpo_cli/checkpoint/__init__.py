"""Checkpoints on disk: writing and restoring a run's state, their integrity, finding them, the best marker."""
