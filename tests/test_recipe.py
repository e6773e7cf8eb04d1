import textwrap

import pytest

from grpo_cli.config import recipe
from grpo_cli.config.recipe import RecipeError, load


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_fill_a_minimal_recipe(tmp_path):
    r = load(write(tmp_path, "train: {steps: 5}\n"))
    assert r.train.steps == 5
    assert r.grpo.group_size == 16 and r.grpo.clip_eps == 0.2 and r.grpo.kl_beta == 0.04
    assert r.model.lora.r == 16
    assert r.completions_per_step == 16 * 8


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, """\
        model:
          name: builtin:tiny-math
        grpo:
          group_size: 4
          kl_bta: 0.02
        """)
    with pytest.raises(RecipeError) as error:
        load(path)
    message = str(error.value)
    assert f"{path}:5:" in message
    assert "grpo.kl_bta: unknown key" in message
    assert "Did you mean 'kl_beta'?" in message


def test_every_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, """\
        model:
          dtype: float64
          lora: {r: 16, alpah: 32}
        grpo:
          group_size: sixteen
        rewards:
          - {rule: correctnes}
        outptu: {dir: x}
        """)
    with pytest.raises(RecipeError) as error:
        load(path)
    message = str(error.value)
    assert "5 problems" in message
    assert f"{path}:2: model.dtype" in message
    assert f"{path}:3: model.lora.alpah: unknown key. Did you mean 'alpha'?" in message
    assert f"{path}:5: grpo.group_size" in message and "'sixteen'" in message
    assert f"{path}:7: rewards.0.rule" in message
    assert f"{path}:8: outptu: unknown key. Did you mean 'output'?" in message


def test_hub_dataset_mapping_is_checked_too(tmp_path):
    path = write(tmp_path, "data:\n  train: {name: openai/gsm8k, confg: main}\n")
    with pytest.raises(RecipeError) as error:
        load(path)
    message = str(error.value)
    assert "data.train.confg: unknown key. Did you mean 'config'?" in message
    assert "1 problem" in message  # not also "should be a valid string" for the other branch


def test_micro_batch_must_divide_the_step(tmp_path):
    path = write(tmp_path, "grpo: {group_size: 4, prompts_per_step: 3, micro_batch_size: 5}\n")
    with pytest.raises(RecipeError) as error:
        load(path)
    assert f"{path}:1: grpo.micro_batch_size: 5 does not divide the step's 12 completions" in str(error.value)
    assert "such as 4" in str(error.value)


def test_cross_field_errors_are_listed_together(tmp_path):
    path = write(tmp_path, """\
        model: {load_in_4bit: true, lora: null}
        rewards:
          - {rule: correctness}
          - {rule: correctness, weight: 2}
        """)
    with pytest.raises(RecipeError) as error:
        load(path)
    message = str(error.value)
    assert "2 problems" in message
    assert "model.load_in_4bit: a 4-bit base cannot be trained directly" in message
    assert f"{path}:4: rewards.1.rule: correctness is listed twice" in message


def test_set_overrides_go_through_validation(tmp_path):
    path = write(tmp_path, "grpo: {kl_beta: 0.04}\nmodel: {lora: null}\n")
    r = load(path, ["grpo.kl_beta=0.02", "model.lora.r=8", "data.train={name: openai/gsm8k, config: main}"])
    assert r.grpo.kl_beta == 0.02
    assert r.model.lora.r == 8 and r.model.lora.alpha == 32
    assert r.data.train.name == "openai/gsm8k"
    with pytest.raises(RecipeError) as error:
        load(path, ["grpo.kl_beta=lots", "train.stepz=3"])
    message = str(error.value)
    assert "--set grpo.kl_beta=lots: grpo.kl_beta" in message
    assert "--set train.stepz=3: train.stepz: unknown key. Did you mean 'steps'?" in message


def test_set_can_change_a_list_item(tmp_path):
    path = write(tmp_path, "rewards:\n  - {rule: correctness}\n  - {rule: step_format, weight: 0.2}\n")
    assert load(path, ["rewards.1.weight=0.5"]).rewards[1].weight == 0.5
    with pytest.raises(RecipeError, match="not an item of the list"):
        load(path, ["rewards.5.weight=0.5"])


@pytest.mark.parametrize("bad", ["grpo.kl_beta", "=3", "grpo..x=1"])
def test_malformed_set_is_explained(tmp_path, bad):
    with pytest.raises(RecipeError, match="--set"):
        load(write(tmp_path, "{}\n"), [bad])


def test_malformed_yaml_points_at_the_line(tmp_path):
    path = write(tmp_path, "grpo:\n  group_size: 4\n   kl_beta: [0.1\n")
    with pytest.raises(RecipeError) as error:
        load(path)
    assert f"{path}:3" in str(error.value) and "malformed YAML" in str(error.value)


def test_a_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="mapping of sections"):
        load(write(tmp_path, "- just\n- a list\n"))


def test_missing_file_is_explained(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    original = load(write(tmp_path, "grpo: {group_size: 4}\ndata: {train: {name: openai/gsm8k, config: main}}\n"))
    again = load(write(tmp_path, recipe.dump(original), "resolved.yaml"))
    assert again == original


def test_reward_rules_have_their_own_keys(tmp_path):
    path = write(tmp_path, """\
        rewards:
          - {rule: correctnes}
          - {rule: python, functon: "a:b"}
          - {rule: length, max_char: 5}
        """)
    with pytest.raises(RecipeError) as error:
        load(path)
    message = str(error.value)
    assert f"{path}:2: rewards.0.rule: unknown rule 'correctnes'. Did you mean 'correctness'?" in message
    assert f"{path}:3: rewards.1.functon: unknown key. Did you mean 'function'?" in message
    assert f"{path}:3: rewards.1.function: required key is missing." in message
    assert f"{path}:4: rewards.2.max_char: unknown key. Did you mean 'max_chars'?" in message


def test_variants_and_their_defaults(tmp_path):
    r = load(write(tmp_path, "grpo: {loss: dr_grpo, clip_eps: 0.2, clip_eps_high: 0.28}\n"))
    assert r.grpo.reward_scaling == "none" and r.grpo.upper_clip == 0.28
    r = load(write(tmp_path, "grpo: {loss: dapo, scale_rewards: batch}\n"))
    assert r.grpo.reward_scaling == "batch" and r.grpo.upper_clip == 0.2
    r = load(write(tmp_path, "rewards:\n  - {rule: python, function: 'pkg.mod:fn'}\n  - {rule: repetition, ngram: 4}\n"))
    assert [x.key for x in r.rewards] == ["fn", "repetition"]


def test_overlong_buffer_must_fit(tmp_path):
    with pytest.raises(RecipeError, match="grpo.overlong_buffer: 64 must be shorter than grpo.max_new_tokens"):
        load(write(tmp_path, "grpo: {max_new_tokens: 64, overlong_buffer: 64}\n"))


def test_max_new_tokens_is_a_number_or_auto_the_default(tmp_path):
    assert load(write(tmp_path, "model: {name: builtin:tiny-math}\n")).grpo.max_new_tokens == "auto"
    assert load(write(tmp_path, "grpo: {max_new_tokens: 512}\n")).grpo.max_new_tokens == 512
    assert load(write(tmp_path, "{}\n"), ["grpo.max_new_tokens=64"]).grpo.max_new_tokens == 64  # --set gives a string
    assert load(write(tmp_path, "grpo: {overlong_buffer: 64}\n")).grpo.overlong_buffer == 64  # checked once resolved
    for bad in ("lots", "0", "Auto", "2.5"):
        with pytest.raises(RecipeError) as error:
            load(write(tmp_path, f"grpo: {{max_new_tokens: {bad}}}\n"))
        assert "1 problem" in str(error.value)
        assert "grpo.max_new_tokens: must be a whole number of tokens (1 or more) or auto" in str(error.value)


def test_two_python_rules_need_different_names(tmp_path):
    path = write(tmp_path, "rewards:\n  - {rule: python, function: 'a:f'}\n  - {rule: python, function: 'b:f'}\n")
    with pytest.raises(RecipeError, match="f is listed twice"):
        load(path)
    assert len(load(path, ["rewards.1.name=g"]).rewards) == 2


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused(tmp_path, seed):
    path = write(tmp_path, f"""\
        train:
          seed: {seed}
        """)
    with pytest.raises(RecipeError, match=rf"{path}:2: train.seed: .* \(got {seed}\)"):
        load(path)


def test_the_held_out_set_follows_the_training_data_unless_set(tmp_path):
    """Unset, data.eval is a builtin training set's own held-out split, and nothing for other data: a
    user's own problems were once evaluated on builtin arithmetic without a word."""
    def held_out(data):
        path = tmp_path / "r.yaml"
        path.write_text(textwrap.dedent(f"data: {data}\n"))
        return load(path).data.eval

    assert held_out("{}") == "builtin:arithmetic-test"
    assert held_out("{train: builtin:arithmetic}") == "builtin:arithmetic-test"
    assert held_out("{train: mine.jsonl}") is None
    assert held_out("{train: arithmetic}") is None  # a file that happens to share a builtin set's name
    assert held_out("{train: {name: openai/gsm8k, config: main}}") is None
    assert held_out("{train: mine.jsonl, eval: held.jsonl}") == "held.jsonl"
    assert held_out("{train: builtin:arithmetic, eval: null}") is None
    # the resolved recipe keeps what was chosen, so a resumed run evaluates on the same set
    path = tmp_path / "mine.yaml"
    path.write_text("data: {train: mine.jsonl}\n")
    assert "eval: null" in recipe.dump(load(path))


def test_chat_template_kwargs_are_a_mapping_for_chat_prompts_only(tmp_path):
    recipe = load(write(tmp_path, "data:\n  chat: true\n  chat_template_kwargs: {enable_thinking: true}\n"))
    assert recipe.data.chat_template_kwargs == {"enable_thinking": True}
    assert load(write(tmp_path, "data: {chat: true}\n")).data.chat_template_kwargs == {}
    with pytest.raises(RecipeError, match="recipe.yaml:1: data: data.chat_template_kwargs .* set data.chat: true"):
        load(write(tmp_path, "data:\n  chat_template_kwargs: {enable_thinking: true}\n"))
    with pytest.raises(RecipeError, match="chat_template_kwargs"):
        load(write(tmp_path, "data:\n  chat: true\n  chat_template_kwargs: [enable_thinking]\n"))


def test_resume_refuses_new_chat_template_kwargs():
    from grpo_cli.config.recipe import changes, validate

    before = validate({"data": {"chat": True}})
    fixed, _ = changes(before, validate({"data": {"chat": True, "chat_template_kwargs": {"enable_thinking": True}}}))
    assert fixed["data.chat_template_kwargs.enable_thinking"] == (None, True)
    assert all(key.startswith("data.chat_template_kwargs") for key in fixed)


@pytest.mark.parametrize("key", ["add_generation_prompt", "messages", "tokenize", "conversation", "chat_template"])
def test_chat_template_kwargs_grpo_passes_itself_are_refused_with_their_line(tmp_path, key):
    """add_generation_prompt or messages among them made a TypeError traceback in validate, train and eval."""
    path = write(tmp_path, f"""\
        data:
          chat: true
          chat_template_kwargs:
            enable_thinking: true
            {key}: false
        """)
    with pytest.raises(RecipeError, match=rf"{path}:3: data.chat_template_kwargs: {key} is not a variable of the chat "
                                          r"template but an argument of apply_chat_template, which grpo sets itself"):
        load(path)
    with pytest.raises(RecipeError, match="the reserved keys are messages, conversation, tokenize, add_generation"):
        load(write(tmp_path, "data: {chat: true}\n"), [f"data.chat_template_kwargs.{key}=1"])


def test_the_reserved_chat_template_kwargs_are_apply_chat_templates_own_arguments():
    """Every argument of apply_chat_template but the template's inputs (tools, documents) is reserved: a new one in a
    later transformers shows up here."""
    import inspect

    from transformers import PreTrainedTokenizerBase

    arguments = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
    assert set(recipe.RESERVED_TEMPLATE_KWARGS) == arguments - {"tools", "documents"} | {"messages"}


def test_a_tool_timeout_no_call_can_meet_is_refused(tmp_path):
    assert recipe.MIN_TOOL_TIMEOUT_S == 0.1
    assert load(write(tmp_path, "grpo: {tool_timeout_s: 0.1}\n")).grpo.tool_timeout_s == 0.1
    for bad in ("0.001", "0", "-1", "601"):
        with pytest.raises(RecipeError, match=r"recipe.yaml:1: grpo.tool_timeout_s: Input should be (greater|less)"):
            load(write(tmp_path, f"grpo: {{tool_timeout_s: {bad}}}\n"))
    for bad in ("0", "-1"):
        with pytest.raises(RecipeError, match=r"grpo.max_tool_calls: Input should be greater than or equal to 1"):
            load(write(tmp_path, f"grpo: {{max_tool_calls: {bad}}}\n"))
