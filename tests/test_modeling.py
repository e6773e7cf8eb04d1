import pytest
import torch

from grpo_cli.errors import UserError
from grpo_cli.model.logprobs import completion_logprobs
from grpo_cli.model.loading import load_policy, resolve
from grpo_cli.config.recipe import ModelSpec
from grpo_cli.rollout.sampling import generate
from grpo_cli.rollout.settings import Sampling


def _logprobs(model, rollout):
    return completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)


@pytest.fixture(scope="module")
def rollout(tiny_model_path):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", lora=None), kl_beta=0.0)
    torch.manual_seed(0)
    return generate(policy.model, policy.tokenizer, ["What is 2 + 3?", "What is 41 + 9?"],
                    Sampling(max_new_tokens=30, samples_per_prompt=2))


def test_lora_reference_is_the_base_model_with_adapters_off(rollout):
    base = load_policy(ModelSpec(name="builtin:tiny-math", lora=None), kl_beta=0.0)
    policy = load_policy(ModelSpec(name="builtin:tiny-math"), kl_beta=0.04)
    assert policy.is_lora and policy.frozen_reference is None
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        with policy.reference() as reference:
            ref = _logprobs(reference, rollout)
        now = _logprobs(policy.model, rollout)
        expected = _logprobs(base.model, rollout)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(ref[mask], expected[mask], atol=1e-5)
    assert not torch.allclose(now[mask], expected[mask], atol=1e-3)


def test_full_fine_tune_keeps_a_frozen_copy_only_with_kl():
    with_kl = load_policy(ModelSpec(name="builtin:tiny-math", lora=None), kl_beta=0.04)
    assert not with_kl.is_lora
    assert all(not p.requires_grad for p in with_kl.frozen_reference.parameters())
    assert len(with_kl.trainable_parameters()) == len(list(with_kl.model.parameters()))
    without = load_policy(ModelSpec(name="builtin:tiny-math", lora=None), kl_beta=0.0)
    assert without.frozen_reference is None
    with pytest.raises(RuntimeError, match="no reference"):
        with without.reference():
            pass


def test_4bit_lora_gradients_survive_an_eval_pass_on_cpu(rollout):
    # bitsandbytes repacks 4-bit layers for CPU inference after an eval-mode forward, and that
    # kernel has no backward; the policy must keep training correctly after each rollout.
    import bitsandbytes as bnb

    from grpo_cli.model.loading import lora_layers

    policy = load_policy(ModelSpec(name="builtin:tiny-math", load_in_4bit=True), kl_beta=0.0)
    bases = [layer.get_base_layer() for layer in lora_layers(policy.model)]
    assert bases and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)  # else nothing here is 4-bit

    def lora_grad():
        policy.model.zero_grad()
        (_logprobs(policy.model, rollout) * rollout.completion_mask).sum().backward()
        return torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None])

    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    before = lora_grad()
    generate(policy.model, policy.tokenizer, ["What is 2 + 3?"], Sampling(max_new_tokens=5, greedy=True))  # an eval-mode pass
    after = lora_grad()
    assert before.abs().sum() > 0
    assert torch.allclose(before, after, atol=1e-5)


def test_missing_model_directory():
    with pytest.raises(UserError, match="model directory ./no-such-model not found"):
        resolve("./no-such-model")


def test_directory_without_a_model(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        resolve(str(tmp_path))


def test_unknown_builtin_model():
    with pytest.raises(UserError, match="builtin:tiny-math"):
        resolve("builtin:huge")


def test_unreachable_hub_model_is_a_user_error():
    # the tests run with HF_HUB_OFFLINE=1: not in the cache, the hub is not asked, and the message says what to do
    with pytest.raises(UserError, match="no-such-org/no-such-model is not in the local Hugging Face cache"):
        load_policy(ModelSpec(name="no-such-org/no-such-model"), kl_beta=0.0)


def test_cuda_requested_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error is for machines without one")
    with pytest.raises(UserError, match="no CUDA GPU"):
        load_policy(ModelSpec(device="cuda"), kl_beta=0.0)


def test_a_hub_model_neither_cached_nor_reachable_is_refused_at_once(monkeypatch):
    """Train, eval and export load through load_tokenizer / load_base: offline, an uncached hub model is
    one short probe and a message, not ~25 s of huggingface_hub's retries and a traceback."""
    import time

    import huggingface_hub
    import huggingface_hub.utils
    import transformers
    from huggingface_hub import constants

    from grpo_cli.model import loading as modeling
    from grpo_cli.errors import UserError
    from grpo_cli.config.recipe import ModelSpec

    probes = []

    class Session:
        def head(self, url, timeout=None):
            probes.append(timeout)
            raise ConnectionError("[Errno -2] Name or service not known")

    def fetched(*args, **kwargs):
        raise AssertionError("the hub was asked for files")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Session)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fetched)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fetched)
    for load in (lambda: modeling.load_tokenizer("some-org/some-model"),
                 lambda: modeling.load_base("some-org/some-model", ModelSpec(name="some-org/some-model"),
                                            torch.device("cpu"), torch.float32)):
        started = time.perf_counter()
        with pytest.raises(UserError, match="some-org/some-model is not in the local Hugging Face cache") as error:
            load()
        assert time.perf_counter() - started < 5 and "hf download some-org/some-model" in str(error.value)
    assert probes == [5.0, 5.0]


def test_a_cached_hub_model_loads_without_asking_the_hub(monkeypatch):
    import huggingface_hub
    import huggingface_hub.utils
    import transformers
    from huggingface_hub import constants

    from grpo_cli.model import loading as modeling

    class Session:
        def head(self, url, timeout=None):
            raise AssertionError("the hub was probed for a cached model")

    loaded = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Session)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kwargs: loaded.append(name) or modeling.builtin_model.build_tokenizer())
    modeling.load_tokenizer("some-org/some-model")
    assert loaded == ["some-org/some-model"]
