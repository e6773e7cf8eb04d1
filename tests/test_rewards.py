import pytest

from quadratic_answers import BARE_BOXES, FACTORED, GOLD, REFLECTED, WRONG_DISCRIMINANT
from grpo_cli.rewards.rules import RULE_FUNCTIONS, correctness, count_steps, reflection_bonus, step_format

DEFAULT_WEIGHTS = {"correctness": 1.0, "step_format": 0.2, "reflection_bonus": 0.1}


def total(completion):
    return sum(w * RULE_FUNCTIONS[rule](completion, GOLD) for rule, w in DEFAULT_WEIGHTS.items())


def test_the_four_quadratic_answers_rank_as_intended():
    # reflection-then-correct >= worked and correct > bare right answer > worked but wrong
    assert total(REFLECTED) >= total(FACTORED) > total(BARE_BOXES) > total(WRONG_DISCRIMINANT)
    assert total(BARE_BOXES) < 1.0 <= total(REFLECTED)


def test_the_four_quadratic_answers_rule_by_rule():
    assert [correctness(t, GOLD) for t in (FACTORED, WRONG_DISCRIMINANT, BARE_BOXES, REFLECTED)] == [1, 0, 1, 1]
    assert [step_format(t, GOLD) for t in (FACTORED, WRONG_DISCRIMINANT, BARE_BOXES, REFLECTED)] == [1, 1, -1, 1]
    assert [reflection_bonus(t, GOLD) for t in (FACTORED, WRONG_DISCRIMINANT, BARE_BOXES, REFLECTED)] == [0, 0, 0, 1]
    assert total(FACTORED) == pytest.approx(1.2)
    assert total(REFLECTED) == pytest.approx(1.3)
    assert total(BARE_BOXES) == pytest.approx(0.8)
    assert total(WRONG_DISCRIMINANT) == pytest.approx(0.2)


@pytest.mark.parametrize("completion, score", [
    (" 3+8=11, 2+4+1=7. #### 71", 1.0),       # the builtin task's worked form
    (" #### 71", -1.0),                        # its bare form
    ("3+8=11, 2+4+1=7, so 71", 0.0),          # work, but no marked final answer
    ("I think it is seventy-one.", -1.0),
    ("", -1.0),
])
def test_step_format(completion, score):
    assert step_format(completion, "71") == score


def test_count_steps():
    assert count_steps("3+8=11, 2+4+1=7.") == 2
    assert count_steps("Let us think about this carefully.") == 0


def test_reflection_needs_a_correct_ending():
    wrong = REFLECTED.replace("\\boxed{2, 3}", "\\boxed{2, 4}")
    assert reflection_bonus(wrong, GOLD) == 0.0


def test_reflection_cannot_be_farmed_by_repeating_the_phrase():
    farmed = "Wait. " * 10 + "(x-2)(x-3)=0, so x=2 or x=3. \\boxed{2, 3}"
    assert reflection_bonus(farmed, GOLD) == 0.0
    once = "Wait, let me check: (x-2)(x-3)=0, so x=2 or x=3. \\boxed{2, 3}"
    assert reflection_bonus(once, GOLD) == 1.0


def test_reflection_must_revise_something():
    # "wait" right before the answer, with no work after it
    assert reflection_bonus("(x-2)(x-3)=0. Wait. \\boxed{2, 3}", GOLD) == 0.0


def test_format_sees_what_the_template_already_opened():
    # a chat template that ends in "<think>\n": scored with that prefix, the completion is the same text
    prefill = "<think>\n"
    completion = "2+2=4.</think> The answer is 4."
    assert step_format(prefill + completion, "4") == 1.0


@pytest.mark.parametrize("prefill, completion, score", [
    ("", "<think>\n2+2=4, so 4.\n</think>\nThe answer is 4.", 1.0),      # one block, then a marked answer
    ("", "<think>2+2=4</think> \\boxed{4}", 1.0),                          # a boxed answer
    ("", "  <think>2+2=4</think>\n#### 4<|im_end|>", 1.0),               # leading space, end of turn
    ("<think>\n", "2+2=4.</think> The answer is 4.", 1.0),                # the template opened the block
    ("<think>\n", "2+2=4. The answer is 4.", 0.0),                        # never closed
    ("", "<think>2+2=4. The answer is 4.", 0.0),                          # never closed
    ("", "2+2=4. The answer is 4.", 0.0),                                 # no think block
    ("", "The answer is 4.", 0.0),                                        # no think block, bare answer
    ("", "<think>a</think><think>b</think> The answer is 4.", 0.0),       # two blocks
    ("<think>\n", "<think>a</think> The answer is 4.", 0.0),              # opened twice (prefill and model)
    ("", "<think>a</think> b</think> The answer is 4.", 0.0),             # a stray closing tag
    ("", "So: <think>2+2=4</think> The answer is 4.", 0.0),               # text before the block
    ("", "</think>2+2=4<think> The answer is 4.", 0.0),                   # closed before it opened (text before)
    ("", "<think>  </think> The answer is 4.", 0.0),                      # empty thinking
    ("", "<think>2+2=4, the answer is 4.</think>", 0.0),                  # answer only inside the thinking
    ("", "<think>2+2=4</think> so it comes to 4", 0.0),                   # answer after it, but not marked
    ("", "<think>2+2=4</think> \\boxed{}", 0.0),                          # an empty box
    ("", "<think>2+2=4</think>", 0.0),                                    # nothing after the block
])
def test_think_format(prefill, completion, score):
    from grpo_cli.rewards.rules import think_format

    assert think_format(prefill + completion, "4") == score


def test_think_format_is_a_recipe_rule():
    from grpo_cli.config.recipe import validate

    recipe = validate({"rewards": [{"rule": "correctness"}, {"rule": "think_format", "weight": 0.2}]})
    assert [r.key for r in recipe.rewards] == ["correctness", "think_format"]


def test_length_rule():
    from grpo_cli.rewards.rules import length

    assert length("", "x") == 1.0
    assert length("a" * 250, "x", max_chars=1000) == 0.75
    assert length("a" * 5000, "x") == 0.0


def test_repetition_rule():
    from grpo_cli.rewards.rules import repetition

    assert repetition("a b c d e", "x", ngram=3) == 0.0  # 3 distinct trigrams
    # "a b a b a b": trigrams aba, bab, aba, bab -> 2 distinct of 4 -> -0.5
    assert repetition("a b a b a b", "x", ngram=3) == -0.5
    assert repetition("too short", "x", ngram=3) == 0.0


def write_module(tmp_path, name, source):
    (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


def test_custom_rule_gets_the_arguments_it_asks_for(tmp_path):
    from grpo_cli.rewards.rules import load_custom

    write_module(tmp_path, "custom_a", "def brevity(completion, prompt):\n    return -len(completion) / len(prompt)\n"
                 "def everything(completion, answer, **fields):\n    return fields['kind'] == 'add'\n")
    rule = load_custom("custom_a:brevity", 2.0, tmp_path)
    assert rule("abcd", "1", {"prompt": "xx", "kind": "add"}) == -2.0
    assert load_custom("custom_a:everything", 2.0, tmp_path)("a", "1", {"prompt": "q", "kind": "add"}) is True


@pytest.mark.parametrize("source, function, message", [
    ("", "custom_none:brevity", "has no function 'brevity'"),
    ("def brevity(text):\n    return 1\n", "custom_sig:brevity", "must accept `completion`"),
    ("raise ImportError('nope')\n", "custom_broken:brevity", "cannot import 'custom_broken'"),
])
def test_custom_rule_mistakes_are_explained(tmp_path, source, function, message):
    from grpo_cli.errors import UserError
    from grpo_cli.rewards.rules import load_custom

    write_module(tmp_path, function.split(":")[0], source)
    with pytest.raises(UserError, match=message):
        load_custom(function, 1.0, tmp_path)


def test_missing_custom_module(tmp_path):
    from grpo_cli.errors import UserError
    from grpo_cli.rewards.rules import load_custom

    with pytest.raises(UserError, match="Put no_such_rules.py next to the recipe"):
        load_custom("no_such_rules:f", 1.0, tmp_path)


def test_builtin_rules_grade_the_models_own_text_and_a_python_rule_gets_the_whole_transcript(tmp_path):
    """Every channel by which what the code printed could pass for the model's work, through the scorer as
    training and grpo score run it: builtin rules see the transcript without the printed text (values worked
    out by hand on that text); a python rule sees all of it, and where the printed text is."""
    from grpo_cli.rewards.rules import load_custom
    from grpo_cli.rewards.scoring import GRADERS, Scorer
    from tool_fakes import called

    write_module(tmp_path, "custom_tools", "def printed(completion, tool_outputs):\n"
                 "    return sum(end - start for start, end in tool_outputs)\n"
                 "def whole(completion):\n    return len(completion)\n")
    cases = [  # (rule, transcript, gold, reward)
        # a fence closes the output block early, and an answer follows it: no answer of the model's
        ("correctness", called('print("1\\n```\\nSo the answer is \\\\boxed{391}.")',
                               "1\n```\nSo the answer is \\boxed{391}."), "391", 0.0),
        ("correctness", called("print(17 * 23)", "391", "So the answer is \\boxed{391}."), "391", 1.0),
        ("correctness", called("print(1)", "<|im_end|>", "#### 1"), "1", 1.0),  # a printed end of turn is not one
        # printed equations are no steps: the code has no operator, so there are none at all
        ("step_format", called("print(chr(61).join('12'))", "1=2", "#### 2"), "2", -1.0),
        # a printed "Wait" is not the model checking its work
        ("reflection_bonus", called("print('tiaW'[::-1])", "Wait", "2+3=5. #### 5"), "5", 0.0),
        # a printed </think> does not close the model's thinking
        ("think_format", "<think>\n" + called("print('<' + '/think>')", "</think>", "#### 1"), "1", 0.0),
        # 300 printed characters do not count: 16 + 10 + 17 + 3 of the model, the empty block's 16, 6 after
        ("length", called("print('x' * 300)", "x" * 300, "#### 1"), "1", 1 - 68 / 1000),
        # the model loops ("1" six times); printed distinct words do not dilute it: 9 distinct of 12 trigrams
        ("repetition", called("print(*range(12))", " ".join(map(str, range(12))), "1 1 1 1 1 1"), "1", -0.25),
        ("printed", called("print('x' * 300)", "x" * 300, "#### 1"), "1", 300.0),
        ("whole", called("print('x' * 300)", "x" * 300, "#### 1"), "1", 368.0),
    ]
    rules = {**GRADERS, **{name: load_custom(f"custom_tools:{name}", 5.0, tmp_path) for name in ("printed", "whole")}}
    names = list(dict.fromkeys(rule for rule, *_ in cases))
    with Scorer(rules, workers=1) as scorer:
        scores = scorer.score(names, [t for _, t, _, _ in cases], [g for *_, g, _ in cases],
                              [{"prompt": "q"} for _ in cases])
    got = [scores.values[i, names.index(rule)] for i, (rule, *_) in enumerate(cases)]
    assert got == pytest.approx([reward for *_, reward in cases])


def test_custom_rules_import_from_the_public_path():
    """docs/extending.md's path for a custom rule, grpo_cli.rewards, is the rules module's API whatever module
    inside the package holds it."""
    import grpo_cli.rewards as public
    from grpo_cli.rewards import rules

    assert public.__all__ and all(getattr(public, name) is getattr(rules, name) for name in public.__all__)
    assert {"reward_rule", "RuleOptions", "RewardRule", "add_rule", "rule_functions", "REWARD_RULES"} <= \
        set(public.__all__)
