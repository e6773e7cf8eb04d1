"""grpo export: merging adapters into a model plain transformers loads, verified."""
