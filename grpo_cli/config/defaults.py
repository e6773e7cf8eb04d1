"""Defaults that more than one place uses, each written here once: the recipe schema, the commands and the
CLI's options (and their help) read them from here. It imports nothing, so any layer may.
"""

# The code tool's limits: the defaults of grpo.max_tool_calls, grpo.tool_timeout_s and grpo.tool_memory_mb, and
# what grpo eval --tools and grpo sandbox run use when neither an option nor a run's recipe says otherwise.
TOOL_MAX_CALLS = 4  # calls per completion
TOOL_TIMEOUT_S = 5.0  # wall clock of one call
TOOL_MEMORY_MB = 1024  # address space of one call

# grpo eval: commands/benchmark.py's EvalOptions and the eval command's options.
EVAL_SAMPLES = 1  # completions per problem; 1 = greedy pass@1
EVAL_TEMPERATURE = 0.6  # sampling, when there is more than one sample
EVAL_TOP_P = 0.95
EVAL_BATCH_SIZE = 32  # prompts per generation batch
EVAL_SEED = 0
EVAL_DEVICE = "auto"
# Completion length: the named set's own, else the run's grpo.max_new_tokens, else EVAL_MAX_NEW_TOKENS.
NAMED_SET_MAX_NEW_TOKENS = {"gsm8k": 512, "math500": 1024}
EVAL_MAX_NEW_TOKENS = 512
