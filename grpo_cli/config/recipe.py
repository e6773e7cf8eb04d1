"""The recipe: a typed schema, YAML loading with line numbers, and `--set` overrides.

Everything a run does is decided here, before any model loads. Unknown keys are
errors that name the file, the line and the closest valid key; every error in a
file is reported at once.

The reward rules a recipe may name, their keys, and the losses come from the registries
`rewards.REWARD_RULES` and `loss.LOSSES`; the schema follows them (`_follow_registries`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, GetPydanticSchema, PlainValidator, TypeAdapter, ValidationError,
                      create_model, field_validator, model_validator)
from pydantic_core import core_schema

from grpo_cli.data import builtin_task
from grpo_cli.errors import UserError
from grpo_cli.update.loss import LOSSES
from grpo_cli.rewards.rules import REWARD_RULES, RewardRule


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(Section):
    """Low-rank adapters (PEFT). The reference policy is the same network with them disabled."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or module names"
    )
    use_rslora: bool = Field(False, description="rank-stabilized LoRA: scale the update by alpha / sqrt(r), not "
                             "alpha / r, so a higher rank does not shrink it")
    use_dora: bool = Field(False, description="DoRA: a trained magnitude vector per output row on top of the "
                           "low-rank direction update (slower: its forward is PEFT's, never the fast engine's folds)")


class ModelSpec(Section):
    name: str = Field("builtin:tiny-math", description="builtin:tiny-math, a local model directory, a hub id, or a "
                      "GGUF file: a path, package:PACKAGE/FILE.gguf (a file an installed package ships), or "
                      "ORG/REPO/FILE.gguf on the hub")
    gguf_file: str | None = Field(
        None, description="a GGUF file inside model.name (a folder, a package: or a hub repository); the same as "
        "writing model.name: NAME/FILE.gguf, which is what the run's saved recipe holds")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="weights' dtype; auto = bfloat16 on a GPU that has it, else float32"
    )
    load_in_4bit: bool = Field(False, description="nf4 base through bitsandbytes (QLoRA); needs lora")
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="null = full fine-tuning")
    adapter: str | None = Field(
        None, description="start from this LoRA adapter on model.name: a PEFT directory, a grpo or Trainer (TRL) "
        "checkpoint, an --adapter-only export, or a hub id; the KL reference is the base with it")
    adapter_mode: Literal["continue", "merge"] = Field(
        "continue", description="continue: train model.adapter itself (its own r, alpha, targets); merge: merge it "
        "into the base and train a fresh model.lora (or, with lora null, every weight) on top")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")

    @model_validator(mode="before")
    @classmethod
    def _gguf_file_joins_name(cls, values):
        # one spelling from here on, so every command (and a resume's comparison of model.name) sees the same
        if isinstance(values, Mapping) and values.get("gguf_file") is not None:
            file, name = values["gguf_file"], values.get("name", "builtin:tiny-math")
            if not isinstance(file, str) or not file.lower().endswith(".gguf"):
                raise ValueError(f"model.gguf_file must name a .gguf file, got {file!r}")
            if not isinstance(name, str) or name.startswith("builtin:") or name.lower().endswith(".gguf"):
                raise ValueError("model.gguf_file names a file inside model.name: set model.name to the folder, "
                                 "package: or hub repository that holds it")
            values = {**values, "name": name.rstrip("/") + "/" + file, "gguf_file": None}
        return values


class HubDataset(Section):
    """A dataset on the Hugging Face hub (or in its local cache)."""

    name: str
    config: str | None = None
    split: str = "train"


DatasetRef = str | HubDataset


# Keys data.chat_template_kwargs cannot hold: apply_chat_template's own arguments, and `messages` (the name the
# template is handed the conversation by), none of them a variable of the template. grpo passes the conversation,
# tokenize=False and add_generation_prompt=True itself (data.render_chat); the others contradict those
# (continue_final_message, ...), replace the template the model is saved and evaluated with (chat_template), or do
# nothing to a prompt rendered as text (return_dict, padding, ...). tools and documents are inputs of the template.
RESERVED_TEMPLATE_KWARGS = (
    "messages", "conversation", "tokenize", "add_generation_prompt", "continue_final_message", "chat_template",
    "return_assistant_tokens_mask", "sanitize_control_tokens", "return_dict", "return_tensors", "padding",
    "truncation", "max_length", "tokenizer_kwargs")


def reserved_template_kwargs(variables: Mapping) -> str | None:
    """Why these chat template variables cannot be given (some are RESERVED_TEMPLATE_KWARGS), or None."""
    taken = [key for key in variables if key in RESERVED_TEMPLATE_KWARGS]
    if not taken:
        return None
    return (f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} not a variable of the chat template but an "
            "argument of apply_chat_template, which grpo sets itself: it renders the conversation (messages) as text "
            "(tokenize=False) with the assistant's turn opened (add_generation_prompt=True), through the model's own "
            f"template. Remove {'it' if len(taken) == 1 else 'them'}; the reserved keys are "
            f"{', '.join(RESERVED_TEMPLATE_KWARGS)}")


class DataSpec(Section):
    train: DatasetRef = Field("builtin:arithmetic", description="builtin set, a .jsonl/.json/.csv/.parquet path, or a hub dataset")
    eval: DatasetRef | None = Field(
        None, description="held-out set; null = no evaluation; unset: follows data.train (see held_out_default)")
    prompt_field: str = Field("question", description="the field holding the problem")
    answer_field: str = Field("answer", description="gold answer; GSM8K's '#### 42' form is understood")
    template: str | None = Field(
        None, description="format string over the row's fields, e.g. 'Q: {question}\\nA:'; null = the prompt field as is"
    )
    chat: bool = Field(False, description="wrap the rendered template in the tokenizer's chat template")
    system_prompt: str | None = Field(None, description="system message when chat is true")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="variables for the chat template when chat is true: {enable_thinking: true}")
    eval_limit: int | None = Field(None, gt=0, description="evaluate on the first N held-out rows only")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, variables: dict) -> dict:
        problem = reserved_template_kwargs(variables)
        if problem:
            raise ValueError(problem)
        return variables

    @model_validator(mode="after")
    def _template_variables_need_chat(self):
        if self.chat_template_kwargs and not self.chat:
            raise ValueError("data.chat_template_kwargs are variables of the chat template, which only a chat prompt "
                             "uses: set data.chat: true, or remove them")
        return self

    @model_validator(mode="before")
    @classmethod
    def _held_out_follows_train(cls, values):
        if isinstance(values, Mapping) and "eval" not in values:
            values = {**values, "eval": held_out_default(values.get("train", "builtin:arithmetic"))}
        return values


def held_out_default(train) -> str | None:
    """data.eval when the recipe leaves it unset: a builtin training set's own held-out split
    (builtin:arithmetic -> builtin:arithmetic-test); for any other data, no evaluation rather than a
    held-out set of a different task (whether a file or hub dataset has a held-out part is not
    known before it loads). The trainer says so when it starts."""
    if isinstance(train, str) and train.startswith("builtin:") \
            and f"{train.removeprefix('builtin:')}-test" in builtin_task.SPLITS:
        return f"{train}-test"
    return None


# grpo.max_new_tokens: auto stops here: a long-context model (Qwen's 32k) would otherwise allow completions far
# longer than a step can afford, while a short one (the builtin model's 256) leaves less than any fixed default.
AUTO_MAX_NEW_TOKENS_CAP = 1024
# ... and never goes below this: training prompts that would leave less are skipped and counted (prompt_room.py),
# rather than one prompt that nearly fills the context cutting every completion off after a few tokens.
MIN_AUTO_MAX_NEW_TOKENS = 32


def _tokens_or_auto(value: Any) -> int | str:
    """A positive whole number of tokens, or "auto"; one message for anything else (not one per type tried)."""
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # from --set
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError("must be a whole number of tokens (1 or more) or auto")


TokensOrAuto = Annotated[Union[int, Literal["auto"]], PlainValidator(_tokens_or_auto)]

# A loss: one of LOSSES' names, read when the schema is built.
LossName = Annotated[str, GetPydanticSchema(lambda _, handler: core_schema.literal_schema(list(LOSSES)))]


# A call to the code tool costs 13-30 ms on 2 cores (docs/tools.md) before the code does anything: below this limit
# calls would time out for want of time to start, and the model be graded on limits it cannot meet.
MIN_TOOL_TIMEOUT_S = 0.1


class GrpoSpec(Section):
    group_size: int = Field(16, ge=2, description="completions per prompt (G)")
    prompts_per_step: int = Field(8, ge=1, description="prompts (groups) per training step")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ratio clipped to [1 - eps, 1 + eps]")
    kl_beta: float = Field(0.04, ge=0, description="weight of the k3 KL to the reference; 0 = no reference pass")
    updates_per_rollout: int = Field(1, ge=1, description="policy updates on each batch of rollouts (mu)")
    max_new_tokens: TokensOrAuto = Field(
        "auto", description="completion length cap; auto = the model's context left after the longest training "
        f"prompt, at most {AUTO_MAX_NEW_TOKENS_CAP}; prompts that would leave less than {MIN_AUTO_MAX_NEW_TOKENS} are "
        "skipped (resolved when the data loads, recorded in the run's recipe.yaml)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs use the same")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    micro_batch_size: int | None = Field(
        None, ge=1, description="most completions per forward/backward pass; null = automatic (by a token budget)"
    )
    engine: Literal["fast", "plain"] = Field(
        "fast", description="fast: shared-prompt rollout and update, length-grouped micro-batches; "
        "plain: transformers' generate and padded micro-batches in order (same samples, for comparison)"
    )
    cuda_graphs: bool = Field(
        True, description="fast engine on a GPU: each decode step recorded once as a CUDA graph and replayed "
        "(llama, mistral, qwen2, qwen3); false = every kernel launched from Python. No effect on CPU"
    )
    loss: LossName = Field(
        "grpo", description=" ".join(f"{name}: {inspect.getdoc(fn).splitlines()[0]}" for name, fn in LOSSES.items())
    )
    clip_eps_high: float | None = Field(
        None, gt=0, description="upper clip: ratio clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's clip-higher); "
        "null = clip_eps"
    )
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None, description="divide advantages by the group's std, the batch's, or not at all; null = group, "
        "or none for dr_grpo"
    )
    dynamic_sampling: bool = Field(
        False, description="drop groups whose rewards are all equal and sample more prompts to fill the step (DAPO)"
    )
    max_sampling_rounds: int = Field(
        3, ge=1, description="with dynamic_sampling: rollouts per step at most (each of prompts_per_step prompts)"
    )
    overlong_buffer: int = Field(
        0, ge=0, description="soft penalty over the last N tokens before max_new_tokens, from 0 to -overlong_penalty "
        "(DAPO); 0 = off"
    )
    overlong_penalty: float = Field(1.0, ge=0, description="the penalty at max_new_tokens")
    mask_truncated: bool = Field(
        False, description="completions cut off at max_new_tokens take no part in the loss (DAPO's overlong filtering)"
    )
    entropy_bonus: float = Field(0.0, ge=0, description="weight of the token entropy added to the objective")
    tools: list[Literal["python"]] = Field(
        default_factory=list, description="tools the model may call: [python] runs each closed ```python block in "
        "a sandbox and appends its output (Qwen2.5-Math's tool-integrated format; docs/tools.md); [] = none"
    )
    max_tool_calls: int = Field(4, ge=1, description="with tools: calls per completion; a block closed after "
                                "that is not run, and its output block says so")
    tool_timeout_s: float = Field(5.0, ge=MIN_TOOL_TIMEOUT_S, le=600,
                                  description="with tools: wall-clock limit of one call")
    tool_memory_mb: int = Field(1024, ge=64, description="with tools: address-space limit of one call")

    @property
    def upper_clip(self) -> float:
        return self.clip_eps_high if self.clip_eps_high is not None else self.clip_eps

    @property
    def reward_scaling(self) -> str:
        return self.scale_rewards or ("none" if self.loss == "dr_grpo" else "group")


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


class TrainSpec(Section):
    steps: int = Field(200, ge=1, description="training steps; one step = one rollout of prompts_per_step groups")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(10, ge=0, description="linear warmup, counted in optimizer steps")
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")
    # NumPy is seeded with it and takes 0 .. 2**32 - 1; outside that a run would pass validate and fail at start.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds Python, NumPy and torch: 0 to 2**32 - 1")
    deterministic: bool = Field(True, description="bit-identical runs for a seed: torch's deterministic "
                                "algorithms (on CUDA with a fixed cuBLAS workspace); false may be faster on a GPU")
    max_bad_steps: int = Field(3, ge=1, description="stop after this many consecutive steps whose loss, rewards "
                               "or gradients were not finite (each is skipped)")


class OutputSpec(Section):
    dir: str = Field("runs/quickstart", description="run directory, relative to where grpo runs")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    eval_every: int = Field(50, ge=1, description="held-out evaluation every N steps (and at start and end)")
    samples_every: int = Field(10, ge=1, description="log sample completions every N steps")
    samples_groups: int = Field(2, ge=0, description="how many groups to log each time")
    keep_last: int | None = Field(None, ge=1, description="keep only the newest N checkpoints; null = all")
    keep_best: bool = Field(True, description="also keep the checkpoint with the highest held-out accuracy "
                            "(saved when an evaluation beats the earlier ones), never pruned by keep_last")
    tensorboard: bool = Field(False, description="also write scalars and samples for tensorboard --logdir <dir>")


class DistributedSpec(Section):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp = every process holds the whole model, gradients averaged; "
        "fsdp = FSDP2 shards weights, gradients and optimizer state across the processes"
    )
    timeout_minutes: int = Field(30, ge=1, description="how long a process waits for the others at a collective")


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


def _follow_registries() -> None:
    """Build the schema again if a reward rule or a loss was registered (or removed) since it was built:
    the rewards union and the loss names are read from the registries as the schema is built."""
    global _built_for
    if _registered() != _built_for:
        GrpoSpec.model_rebuild(force=True)
        Recipe.model_rebuild(force=True)  # after GrpoSpec: it holds GrpoSpec's schema
        _built_for = _registered()


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


def cross_field_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """(path, message) for settings that are each valid but do not fit together."""
    problems = []
    grpo = recipe.grpo
    micro = grpo.micro_batch_size
    if micro is not None and recipe.completions_per_step % micro:
        problems.append((
            ("grpo", "micro_batch_size"),
            f"{micro} does not divide the step's {recipe.completions_per_step} completions "
            f"(prompts_per_step {grpo.prompts_per_step} x group_size {grpo.group_size}); "
            f"use a divisor such as {_largest_divisor_at_most(recipe.completions_per_step, micro)}",
        ))
    if recipe.model.load_in_4bit and recipe.model.lora is None:
        problems.append((
            ("model", "load_in_4bit"),
            "a 4-bit base cannot be trained directly; set model.lora (QLoRA) or load_in_4bit: false",
        ))
    if recipe.model.adapter is not None and recipe.model.adapter_mode == "continue" and recipe.model.lora is None:
        problems.append((
            ("model", "adapter_mode"),
            "continue trains model.adapter itself, a LoRA, so model.lora cannot be null; use adapter_mode: merge "
            "to merge the adapter into the base and fine-tune every weight",
        ))
    if recipe.model.adapter is not None and recipe.model.adapter_mode == "merge" and recipe.model.load_in_4bit:
        problems.append((
            ("model", "adapter_mode"),
            "merge into a 4-bit base would round the adapter away; use adapter_mode: continue (QLoRA on the "
            "adapter) or load_in_4bit: false",
        ))
    if grpo.tools and grpo.engine != "fast":
        problems.append((("grpo", "engine"), "grpo.tools needs the fast engine: transformers' generate (plain) "
                         "cannot pause a completion while its code runs; use engine: fast"))
    keys = [r.key for r in recipe.rewards]
    for index, key in enumerate(keys):
        if key in keys[:index]:
            problems.append((("rewards", index, "rule"), f"{key} is listed twice; give each rule one weight "
                             "(or two python rules different names)"))
    if grpo.max_new_tokens != "auto" and grpo.overlong_buffer >= grpo.max_new_tokens:  # auto: checked when resolved
        problems.append((("grpo", "overlong_buffer"), f"{grpo.overlong_buffer} must be shorter than "
                         f"grpo.max_new_tokens ({grpo.max_new_tokens})"))
    return problems


def out_of_bounds(section: type[Section], key: str, value: Any) -> str | None:
    """Why `value` is not a valid `key` of `section` (pydantic's words: "Input should be greater than 0"), or None.
    For a command-line option that stands for a recipe key, so its bounds are the key's, stated once."""
    field = section.model_fields[key]
    try:
        TypeAdapter(Annotated[(field.annotation, *field.metadata)]).validate_python(value)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return None


# ---------------------------------------------------------------- loading


class RecipeError(UserError):
    pass


def _line_map(text: str) -> dict[tuple, int]:
    """1-based line of every key and list item in the YAML text, by its path."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = path + (key_node.value,)
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _fields_at(raw_loc: tuple) -> list[str]:
    """Valid key names of the section that pydantic's `raw_loc` points into."""
    if len(raw_loc) > 2 and raw_loc[0] == "rewards" and raw_loc[2] in RULE_SPECS:
        return list(RULE_SPECS[raw_loc[2]].model_fields)
    loc = _clean_loc(raw_loc)
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _section_type(annotation) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        for inner in [candidate, *getattr(candidate, "__args__", ())]:
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags ('str', 'HubDataset', 'list[str]', a reward's rule) so a loc is
    a recipe path."""
    tags = {"str", "int", "float", "bool", "none", *(c.__name__ for c in Section.__subclasses__())}
    loc = tuple(p for p in loc if not (isinstance(p, str) and (p in tags or "[" in p)))
    if len(loc) > 2 and loc[0] == "rewards" and loc[2] in RULE_SPECS:
        loc = loc[:2] + loc[3:]
    return loc


def _describe(error: dict) -> str:
    loc = _clean_loc(error["loc"])
    dotted = ".".join(str(p) for p in loc) or "recipe"
    if error["type"] == "extra_forbidden":
        valid = _fields_at(tuple(error["loc"]))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        section = ".".join(str(p) for p in loc[:-1]) or "the recipe"
        return f"{dotted}: unknown key.{hint} Valid keys in {section}: {', '.join(valid)}."
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] in ("missing",):
        return f"{dotted}: required key is missing."
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = error.get("ctx", {}).get("tag")
        close = difflib.get_close_matches(str(tag), list(RULE_SPECS), n=1, cutoff=0.5) if tag else []
        hint = f" Did you mean '{close[0]}'?" if close else ""
        given = f"unknown rule {tag!r}." if tag else "each reward needs a rule."
        return f"{dotted}.rule: {given}{hint} The rules are: {', '.join(RULE_SPECS)}."
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{dotted}: {message}{shown}."


def _drop_union_noise(errors: list[dict]) -> list[dict]:
    """A `str | mapping` field reports one error per branch; keep the one that says what is wrong."""
    kept, seen = [], set()
    for error in errors:
        loc = _clean_loc(error["loc"])
        deeper = any(
            len(_clean_loc(other["loc"])) > len(loc) and _clean_loc(other["loc"])[: len(loc)] == loc
            for other in errors
        )
        if (error["type"].endswith("_type") and deeper) or loc in seen:
            continue
        seen.add(loc)
        kept.append(error)
    return kept


def _report(items: list[tuple[tuple, str]], source: str, lines: dict) -> RecipeError:
    located = [(_nearest_line(lines, loc), text) for loc, text in items]
    located.sort(key=lambda item: item[0] if isinstance(item[0], int) else float("inf"))  # file order, then --set
    paragraphs = []
    for line, text in located:
        where = f"{source}:{line}" if isinstance(line, int) else (line or source)
        paragraphs.append(f"  {where}: {text}")
    count = len(paragraphs)
    head = f"{source}: {count} problem{'s' if count > 1 else ''} in the recipe:"
    return RecipeError("\n".join([head, *paragraphs]))


def validate(data: dict, source: str = "recipe", lines: dict[tuple, Any] | None = None) -> Recipe:
    """A Recipe from plain data, or a RecipeError listing every problem with its line."""
    lines = lines or {}
    _follow_registries()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = _drop_union_noise(exc.errors())
        raise _report([(_clean_loc(e["loc"]), _describe(e)) for e in errors], source, lines) from None
    problems = cross_field_problems(recipe)
    if problems:
        raise _report([(loc, f"{'.'.join(map(str, loc))}: {text}.") for loc, text in problems], source, lines)
    return recipe


def _nearest_line(lines: dict[tuple, int | str], loc: tuple):
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def parse_override(text: str) -> tuple[tuple, Any]:
    """'grpo.kl_beta=0.02' -> (('grpo', 'kl_beta'), 0.02); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected KEY=VALUE, e.g. --set grpo.kl_beta=0.02")
    key, raw = text.split("=", 1)
    parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    if not key.strip() or any(p == "" for p in parts):
        raise RecipeError(f"--set {text}: the key must be a dotted path such as grpo.kl_beta")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({exc})") from None
    return parts, value


def apply_override(data: dict, path: tuple, value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(f"--set {text}: {'.'.join(map(str, path[: i + 1]))} is not an item of the list")
            node = node[part]
            continue
        child = node.get(part)
        if not isinstance(child, (dict, list)):
            # A missing or null section (e.g. `lora: null`) becomes a mapping the override fills in.
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError(f"--set {text}: {'.'.join(map(str, path))} is not an item of the list")
    node[last] = value


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise RecipeError(f"recipe {path} not found{hint}. Pass the path of a YAML recipe, e.g. recipes/quickstart.yaml.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        lines: dict[tuple, Any] = _line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: malformed YAML: {problem}. Check the indentation and quoting there.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, data, grpo, ...), not a {type(data).__name__}.")
    for text_override in overrides:
        key, value = parse_override(text_override)
        apply_override(data, key, value, text_override)
        for known in list(lines):
            if known[: len(key)] == key:
                del lines[known]
        lines[key] = f"--set {text_override}"
    return validate(data, source=str(path), lines=lines)


# Settings a resumed run cannot change without training something else than what the checkpoint holds.
RESUME_FIXED = ("model.name", "model.load_in_4bit", "model.lora", "data.train", "data.prompt_field",
                "data.answer_field", "data.template", "data.chat", "data.system_prompt", "grpo.group_size",
                "train.seed", "data.chat_template_kwargs", "model.adapter", "model.adapter_mode")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def changes(before: Recipe, after: Recipe) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(changes resume must refuse, changes it can allow), each {dotted key: (before, after)}."""
    old, new = _flatten(before.model_dump(mode="json")), _flatten(after.model_dump(mode="json"))
    changed = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}
    if new.get("grpo.max_new_tokens") == "auto":
        changed.pop("grpo.max_new_tokens", None)  # a resumed run keeps the number auto resolved to when it started
    fixed = {k: v for k, v in changed.items() if any(k == f or k.startswith(f + ".") for f in RESUME_FIXED)}
    return fixed, {k: v for k, v in changed.items() if k not in fixed}


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default written out."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
