"""Data: datasets to prompts and gold answers, the builtin task, the data order, prompts that fit the context."""
