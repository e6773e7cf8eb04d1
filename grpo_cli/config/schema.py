"""The whole recipe (Recipe): its sections and its rewards, kept in step with the registries of reward rules and
losses (`follow_registries`); how to read a section's keys from outside (`section_type`, `out_of_bounds`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from grpo_cli.config.rule_entries import RULE_SPECS, RewardSpec
from grpo_cli.config.sections import DataSpec, DistributedSpec, GrpoSpec, ModelSpec, OutputSpec, Section, TrainSpec
from grpo_cli.rewards.rules import REWARD_RULES
from grpo_cli.update.loss import LOSSES


class Recipe(Section):
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    grpo: GrpoSpec = Field(default_factory=GrpoSpec)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RULE_SPECS["correctness"](rule="correctness")],
                                      min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

    @property
    def completions_per_step(self) -> int:
        return self.grpo.prompts_per_step * self.grpo.group_size


def _registered() -> tuple:
    return tuple(REWARD_RULES.values()), tuple(LOSSES)


_built_for = _registered()  # what the schema's rule entries and loss names were built from


def follow_registries() -> None:
    """Build the schema again if a reward rule or a loss was registered (or removed) since it was built:
    the rewards union and the loss names are read from the registries as the schema is built."""
    global _built_for
    if _registered() != _built_for:
        GrpoSpec.model_rebuild(force=True)
        Recipe.model_rebuild(force=True)  # after GrpoSpec: it holds GrpoSpec's schema
        _built_for = _registered()


def out_of_bounds(section: type[Section], key: str, value: Any) -> str | None:
    """Why `value` is not a valid `key` of `section` (pydantic's words: "Input should be greater than 0"), or None.
    For a command-line option that stands for a recipe key, so its bounds are the key's, stated once."""
    field = section.model_fields[key]
    try:
        TypeAdapter(Annotated[(field.annotation, *field.metadata)]).validate_python(value)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return None


def section_type(annotation) -> type[BaseModel] | None:
    """The section (a pydantic model) a field's annotation holds, through Optional and unions; None for a plain
    value."""
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        for inner in [candidate, *getattr(candidate, "__args__", ())]:
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None
