"""The commands beside train: eval, score, plot, validate's estimate, sandbox run."""
