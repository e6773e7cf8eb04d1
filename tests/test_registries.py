"""Adding a reward rule or a loss is one registration: the recipe schema, its error hints, the
scorer and the update's loss lookup all follow the registries (docs/extending.md).

The scoring workers import this module to find `mentions` (they are spawned): its top level
imports only what a worker has loaded anyway."""

import json

import pytest
from pydantic import Field

from grpo_cli.rewards.rules import REWARD_RULES, RuleOptions, reward_rule


class MentionsOptions(RuleOptions):
    word: str = Field("wait", min_length=1, description="the word to look for")


def mentions(completion: str, answer: str, word: str = "wait") -> float:
    """1 when the completion says `word`."""
    return float(word in completion.lower().split())


@pytest.fixture
def registries():
    """What a test registers is gone after it."""
    from grpo_cli.update.loss import LOSSES

    rules, losses = dict(REWARD_RULES), dict(LOSSES)
    yield
    REWARD_RULES.clear()
    REWARD_RULES.update(rules)
    LOSSES.clear()
    LOSSES.update(losses)


def test_a_rule_registered_once_is_a_recipe_key_scored_as_training_scores_it(registries, tmp_path):
    from grpo_cli.config.recipe import RecipeError, validate
    from grpo_cli.commands.score import score_completions
    from grpo_cli.rewards.scoring import GRADERS

    reward_rule(MentionsOptions)(mentions)  # as `@reward_rule(MentionsOptions)` on its definition

    recipe = validate({"rewards": [{"rule": "correctness"}, {"rule": "mentions", "word": "hmm", "weight": 0.5}]})
    assert [r.key for r in recipe.rewards] == ["correctness", "mentions"] and recipe.rewards[1].word == "hmm"
    assert GRADERS["mentions"] is mentions  # the scorer's default rules know it too
    path = tmp_path / "completions.jsonl"
    path.write_text(json.dumps({"question": "1 + 1?", "answer": "2", "completions": ["hmm 1+1=2. #### 2", "#### 3"]}))
    [group] = score_completions(recipe, path)  # in the scoring workers, as training scores
    assert [c.rewards for c in group.completions] == [{"correctness": 1.0, "mentions": 1.0},
                                                      {"correctness": 0.0, "mentions": 0.0}]
    assert [c.total for c in group.completions] == [1.5, 0.0]

    # its name and keys are in the hints, as the built-in rules' are
    with pytest.raises(RecipeError) as error:
        validate({"rewards": [{"rule": "mention"}, {"rule": "mentions", "wrod": "hmm"},
                              {"rule": "mentions", "word": ""}]})
    message = str(error.value)
    assert "rewards.0.rule: unknown rule 'mention'. Did you mean 'mentions'?" in message
    assert "The rules are: correctness, " in message and ", mentions." in message
    assert "rewards.1.wrod: unknown key. Did you mean 'word'? Valid keys in rewards.1: weight, name, rule, word." \
        in message
    assert "rewards.2.word: String should have at least 1 character" in message

    del REWARD_RULES["mentions"]  # and unregistered, it is refused again
    with pytest.raises(RecipeError, match="unknown rule 'mentions'"):
        validate({"rewards": [{"rule": "mentions"}]})


def test_a_loss_registered_once_is_a_recipe_choice_and_the_update_uses_it(registries):
    import dataclasses

    import torch

    from grpo_cli.update import policy as update
    from grpo_cli.update.loss import LOSSES, LossSettings, grpo, register_loss
    from grpo_cli.config.recipe import RecipeError, validate

    @register_loss
    def halved(logp, old_logp, advantages, mask, settings, ref_logp=None, entropy=None):
        """Half of grpo's loss."""
        terms = grpo(logp, old_logp, advantages, mask, settings, ref_logp, entropy)
        return dataclasses.replace(terms, per_completion=terms.per_completion / 2)

    recipe = validate({"grpo": {"loss": "halved"}})
    assert update.LOSSES is LOSSES and LOSSES[recipe.grpo.loss] is halved  # update_policy's lookup
    logp, mask = torch.zeros(2, 3), torch.tensor([[1, 0, 0], [1, 1, 1]])
    settings = LossSettings(clip_low=0.2, clip_high=0.2, step_completions=2)
    assert halved(logp, logp, torch.tensor([1.0, -1.0]), mask, settings).per_completion.tolist() == [-0.25, 0.25]

    del LOSSES["halved"]
    with pytest.raises(RecipeError, match="grpo.loss: Input should be 'grpo', 'dapo', 'dr_grpo' or 'gspo'"):
        validate({"grpo": {"loss": "halved"}})


def test_a_registration_that_cannot_work_is_refused_when_made(registries):
    from grpo_cli.update.loss import grpo, register_loss
    from grpo_cli.rewards.rules import correctness

    with pytest.raises(ValueError, match="a reward rule named 'correctness' is registered already"):
        reward_rule()(correctness)
    with pytest.raises(ValueError, match="a loss named 'grpo' is registered already"):
        register_loss(grpo)
    def says(completion, answer):
        return 1.0

    def other(completion, answer, word="hmm"):
        return 1.0

    with pytest.raises(TypeError, match="option 'word' is no argument of says"):
        reward_rule(MentionsOptions)(says)
    with pytest.raises(TypeError, match="option 'word' defaults to 'wait', other to 'hmm'"):
        reward_rule(MentionsOptions)(other)

    class Weighted(RuleOptions):
        weight: float = 2.0

    with pytest.raises(TypeError, match="every entry has weight already"):
        reward_rule(Weighted, name="weighted")(lambda completion, answer, weight=2.0: weight)
    assert not {"says", "other", "weighted"} & set(REWARD_RULES)
