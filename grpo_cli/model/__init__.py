"""Models: resolving a name (hub, GGUF, builtin), loading with LoRA / 4-bit, adapters, the LoRA layers' fast path."""
