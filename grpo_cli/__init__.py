"""grpo: fine-tune language models with GRPO from YAML recipes."""

__version__ = "0.1.0"
