"""grpo export: a checkpoint written as a model others load, verified. build.py runs it; formats.py names the
formats (protocol.py: what one implements; merged.py, adapter.py); check.py writes and verifies every format the
same way; transaction.py keeps --out whole; card.py writes the model card."""
