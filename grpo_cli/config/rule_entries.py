"""The rewards section's entries: one class per registered reward rule, its keys `weight`, `name` and `rule`
(_Rule's) then its options' (rewards.RuleOptions), told apart by `rule`. RULE_SPECS is a live view of the
registry `rewards.REWARD_RULES`: a rule registered later has its entry too (schema.py rebuilds the schema).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Annotated, Literal, Union

from pydantic import Field, GetPydanticSchema, create_model

from grpo_cli.config.sections import Section
from grpo_cli.rewards.rules import REWARD_RULES, RewardRule


class _Rule(Section):
    """The keys every reward entry has; each registered rule adds its own (rewards.RuleOptions)."""

    weight: float = Field(1.0, description="its weight in the reward sum")
    name: str | None = Field(None, description="name in metrics (reward/<name>); default: the rule, or the function")
    rule: str  # narrowed to the rule's name in each rule's entry class

    @property
    def key(self) -> str:
        return self.name or self.default_name(self.rule)  # default_name: from the rule's options class


@functools.cache
def _entry_class(rule: RewardRule) -> type[_Rule]:
    """The recipe entry of a registered rule: _Rule's keys, `rule: <its name>`, then its options' keys."""
    title = "".join(part.title() for part in rule.name.split("_")) + "Rule"
    return create_model(title, __base__=(rule.options, _Rule), __module__=__name__, rule=(Literal[rule.name], ...))


class _EntryClasses(Mapping[str, type[_Rule]]):
    """rule name -> its entry class, for every rule registered now (a live view of REWARD_RULES)."""

    def __getitem__(self, name: str) -> type[_Rule]:
        return _entry_class(REWARD_RULES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(REWARD_RULES))

    def __len__(self) -> int:
        return len(REWARD_RULES)


RULE_SPECS: Mapping[str, type[_Rule]] = _EntryClasses()

# A reward entry: one of RULE_SPECS, told apart by its `rule`. The union is made when the schema is built.
RewardSpec = Annotated[_Rule, GetPydanticSchema(lambda _, handler: handler.generate_schema(
    Annotated[Union[tuple(RULE_SPECS.values())], Field(discriminator="rule")]))]
