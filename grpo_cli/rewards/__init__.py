"""Rewards: the rule registry and rules, answer extraction and equivalence, the scoring worker pool.

A custom rule imports what it needs from here (docs/extending.md), which stays the public path
whatever module inside the package holds it."""

from grpo_cli.rewards.rules import (
    REWARD_RULES, RULE_FUNCTIONS, CustomRule, RewardRule, RuleOptions, add_rule, correctness, length,
    reflection_bonus, repetition, reward_rule, rule_functions, step_format, think_format,
)

__all__ = ["REWARD_RULES", "RULE_FUNCTIONS", "CustomRule", "RewardRule", "RuleOptions", "add_rule", "correctness",
           "length", "reflection_bonus", "repetition", "reward_rule", "rule_functions", "step_format", "think_format"]
