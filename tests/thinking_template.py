"""A chat tokenizer for a model that thinks in <think>...</think>: the builtin tokenizer with a chat
template that opens the think block for the assistant when enable_thinking is true (Qwen3 opens it
by default; this one makes the variable visible in every prompt)."""

from grpo_cli.model import builtin as builtin_model

THINKING_TEMPLATE = builtin_model.CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking %}<think>\n{% endif %}{% endif %}")
assert THINKING_TEMPLATE != builtin_model.CHAT_TEMPLATE

# Qwen3's way: thinking is the default, and only enable_thinking false changes the prompt (an empty block)
QWEN3_STYLE_TEMPLATE = builtin_model.CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def thinking_tokenizer(template: str = THINKING_TEMPLATE):
    tokenizer = builtin_model.build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer
