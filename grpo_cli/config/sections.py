"""The recipe's sections (model, data, grpo, train, output, distributed): each key's type, default, bounds and
meaning, and the checks of one section's keys together. The rewards section's entries are in rule_entries.py,
the whole recipe in schema.py.

The loss names come from the registry `loss.LOSSES`, read when the schema is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, GetPydanticSchema, PlainValidator, field_validator, model_validator
from pydantic_core import core_schema

from grpo_cli.config.defaults import TOOL_MAX_CALLS, TOOL_MEMORY_MB, TOOL_TIMEOUT_S
from grpo_cli.data import builtin_task
from grpo_cli.trackers.builtin import tracker_names
from grpo_cli.update.loss import LOSSES
from grpo_cli.update.sampler_correction import Correction


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
        "checkpoint, an adapter export (grpo export --format adapter), or a hub id; the KL reference is the base with it")
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
# ... and never goes below this: training prompts that would leave less are skipped and counted (data/prompt_room.py),
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


# A call to the code tool takes some milliseconds to start before the code does anything (docs/tools.md measures
# it): below this limit calls would time out for want of time to start, and the model be graded on limits it cannot
# meet.
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
    sampler_correction: Literal["none", "tis", "mask"] = Field(
        "none", description="correct the update for where the sampler's log-probs differ from the training "
        "forward's (docs/algorithm.md): tis = weigh each token's clipped term by min(ratio, sampler_ratio_high); "
        "mask = by the ratio inside [sampler_ratio_low, sampler_ratio_high], 0 outside; none = no weight"
    )
    sampler_correction_level: Literal["token", "sequence"] = Field(
        "token", description="the ratio the correction uses: each token's, or one per completion (the geometric "
        "mean of its tokens')"
    )
    sampler_ratio_low: float = Field(0.5, gt=0, lt=1, description="mask: ratios below are dropped")
    sampler_ratio_high: float = Field(2.0, gt=1, description="tis: the cap on the weight; mask: ratios above "
                                      "are dropped")
    tools: list[Literal["python"]] = Field(
        default_factory=list, description="tools the model may call: [python] runs each closed ```python block in "
        "a sandbox and appends its output (Qwen2.5-Math's tool-integrated format; docs/tools.md); [] = none"
    )
    max_tool_calls: int = Field(TOOL_MAX_CALLS, ge=1, description="with tools: calls per completion; a block closed after "
                                "that is not run, and its output block says so")
    tool_timeout_s: float = Field(TOOL_TIMEOUT_S, ge=MIN_TOOL_TIMEOUT_S, le=600,
                                  description="with tools: wall-clock limit of one call")
    tool_memory_mb: int = Field(TOOL_MEMORY_MB, ge=64, description="with tools: address-space limit of one call")

    @property
    def upper_clip(self) -> float:
        return self.clip_eps_high if self.clip_eps_high is not None else self.clip_eps

    @property
    def correction(self) -> Correction:
        return Correction(method=self.sampler_correction, level=self.sampler_correction_level,
                          low=self.sampler_ratio_low, high=self.sampler_ratio_high)

    @property
    def reward_scaling(self) -> str:
        return self.scale_rewards or ("none" if self.loss == "dr_grpo" else "group")


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
    report_to: list[str] = Field(
        [], description="trackers the metrics, samples and recipe also go to, besides metrics.jsonl and "
        f"samples.jsonl: any of {', '.join(tracker_names())} (docs/runs.md)")
    project: str = Field("grpo", min_length=1, description="the trackers' project (W&B project, MLflow "
                         "experiment, Trackio project)")
    run_name: str | None = Field(None, min_length=1, description="the run's name in the trackers; default: the run "
                                 "directory's name")
    tensorboard: bool = Field(False, description="the older form of report_to: [tensorboard]")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in tracker_names()]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}: choose from {', '.join(tracker_names())}")
        if len(set(names)) < len(names):
            raise ValueError("a tracker is named twice")
        return names

    @property
    def trackers(self) -> list[str]:
        """report_to, with tensorboard when the older `tensorboard: true` asks for it."""
        return self.report_to + (["tensorboard"] if self.tensorboard and "tensorboard" not in self.report_to else [])


class DistributedSpec(Section):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp = every process holds the whole model, gradients averaged; "
        "fsdp = FSDP2 shards weights, gradients and optimizer state across the processes"
    )
    timeout_minutes: int = Field(30, ge=1, description="how long a process waits for the others at a collective")
