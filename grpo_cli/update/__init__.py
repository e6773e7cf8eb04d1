"""The update: group-relative advantages, the losses, per-token log-probs, micro-batches, the optimizer step."""
