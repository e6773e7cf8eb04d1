import pytest
import torch
from conftest import trained_lora_policy
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from grpo_cli.rollout import decoder
from grpo_cli.model.calls import position_ids
from grpo_cli.model.loading import load_policy
from grpo_cli.config.recipe import ModelSpec
from grpo_cli.rollout.sampling import foldable_lora_layers, generate
from grpo_cli.rollout.settings import Sampling

SHAPE = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
# Qwen3's head_dim comes from its config, not hidden_size / heads (Qwen3-0.6B: 128, not 1024 / 16).
QWEN3 = dict(SHAPE, head_dim=24)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # Llama 3.1-3.3's rotary scaling


def random_model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def reference_logits(model, ids, mask):
    """The model's own forward: next-token logits at the last position. [N, V]"""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1].float()


def check_against_forward(model, foldable=(), mode="eager"):
    prompts = torch.randint(3, 50, (3, 7))
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0  # left padding, as the tokenizer pads prompts
    mask[2, :1] = 0
    samples, new = 2, torch.randint(3, 50, (6, 5))
    lean = decoder.LeanDecoder(model, capacity=7 + 5, foldable=list(foldable), mode=mode)
    with torch.no_grad():
        logits = lean.prefill(prompts, mask, samples)  # [6, V]
        ids, full_mask = prompts.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
        for t in range(new.shape[1]):
            torch.testing.assert_close(logits, reference_logits(model, ids, full_mask), rtol=1e-4, atol=1e-4)
            logits = lean.step(new[:, t])
            ids = torch.cat([ids, new[:, t : t + 1]], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(new[:, :1])], 1)
            if t == 2:  # drop rows as finished ones are dropped, keep the others' caches
                kept = torch.tensor([0, 3, 5])
                lean.keep(kept)
                logits, ids, full_mask, new = logits[kept], ids[kept], full_mask[kept], new[kept]


@pytest.mark.parametrize("config", [
    LlamaConfig(**SHAPE),
    Qwen2Config(**SHAPE),  # q/k/v with biases
    MistralConfig(**SHAPE, sliding_window=None),
    LlamaConfig(**{**SHAPE, "num_key_value_heads": 4}),  # no grouped queries
    LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE),
    Qwen3Config(**QWEN3),  # per-head q/k RMSNorms before the rotary embedding
    Qwen3Config(**QWEN3, attention_bias=True),
], ids=["llama", "qwen2", "mistral", "llama-mha", "llama3-rope", "qwen3", "qwen3-bias"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_same_logits_as_the_model_s_forward(config, mode):
    model = random_model(config)
    assert decoder.supports(model)
    check_against_forward(model, mode=mode)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_folded_lora_same_logits_as_the_adapters(tiny_model_path, mode):
    policy = trained_lora_policy()
    policy.model.eval()
    layers = foldable_lora_layers(policy.model)
    lean = decoder.LeanDecoder(policy.model, 20, layers)
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in lean.layers)  # folded and fused
    check_against_forward(policy.model, layers, mode)


@pytest.mark.parametrize("spec", [
    {"dtype": "float32", "lora": {"r": 8, "alpha": 16}, "load_in_4bit": True},  # nf4 base: modules, adapters on
    {"dtype": "float32", "lora": {"r": 8, "alpha": 16}, "fold": False},  # LoRA modules, not folded
    {"dtype": "float32", "lora": None},  # full fine-tune: plain Linear modules
], ids=["nf4-lora", "lora-unfolded", "full"])
def test_unfolded_projections_run_through_their_modules(tiny_model_path, spec):
    spec = dict(spec)
    fold = spec.pop("fold", True)
    policy = trained_lora_policy(**spec)
    policy.model.eval()
    layers = foldable_lora_layers(policy.model) if fold else []
    lean = decoder.LeanDecoder(policy.model, 20, layers)
    assert all(layer.qkv is None and layer.gate_up is None for layer in lean.layers)
    check_against_forward(policy.model, layers)
    check_against_forward(policy.model, layers, mode="static")


def random_lora_model(config):
    """A random model with LoRA on every linear layer (r 8, alpha 16), its adapters not zero."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_model(config), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_qwen3_with_lora_same_logits_as_the_adapters(fold, mode):
    model = random_lora_model(Qwen3Config(**QWEN3))
    assert decoder.supports(model)
    layers = foldable_lora_layers(model) if fold else []
    lean = decoder.LeanDecoder(model, 20, layers)
    assert all((layer.qkv is not None and layer.gate_up is not None) == fold for layer in lean.layers)
    assert all(layer.q_norm is not None and layer.k_norm is not None for layer in lean.layers)
    check_against_forward(model, layers, mode)


def test_architectures_it_does_not_know_use_transformers_forward():
    assert not decoder.supports(random_model(MistralConfig(**SHAPE, sliding_window=4)))  # keys drop out of a window
    from transformers import GPT2Config

    assert not decoder.supports(random_model(GPT2Config(vocab_size=50, n_embd=64, n_layer=2, n_head=4)))
    # a window on the layers from max_window_layers on: per-layer sliding attention
    windowed = Qwen3Config(**QWEN3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert windowed.layer_types == ["full_attention", "sliding_attention"]
    assert not decoder.supports(random_model(windowed))


def test_qwen3_without_its_q_k_norms_is_refused():
    model = random_model(Qwen3Config(**QWEN3))
    del model.model.layers[1].self_attn.q_norm  # not the attention the lean decoder knows for qwen3
    assert not decoder.supports(model)


@pytest.fixture
def made(monkeypatch):
    """One entry per LeanDecoder built: which way a rollout went."""
    built = []

    class Counted(decoder.LeanDecoder):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(decoder, "LeanDecoder", Counted)
    return built


def test_sampling_draws_the_same_tokens_either_way(tiny_model_path, made):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    prompts = ["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0.", "What is 7 * 38?"]
    out, decoders = {}, {}
    for lean in (True, False):
        torch.manual_seed(7)
        made.clear()
        out[lean] = generate(policy.model, policy.tokenizer, prompts,
                             Sampling(max_new_tokens=40, samples_per_prompt=6, lean=lean))
        decoders[lean] = len(made)
    assert decoders == {True: 1, False: 0}  # the two ways are two: the lean decoder, then transformers' forward
    assert torch.equal(out[True].input_ids, out[False].input_ids)
    assert len(set(out[True].lengths.tolist())) > 1  # rows ended at different steps: rows were dropped


def test_qwen3_samples_the_same_tokens_either_way(tiny_model_path, made):
    """End to end through `generate`: a random Qwen3 with the builtin tokenizer (101 tokens, pad 0, EOS 1)."""
    from transformers import AutoTokenizer

    model = random_lora_model(Qwen3Config(**{**QWEN3, "vocab_size": 101}, pad_token_id=0, eos_token_id=1))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    out = {}
    for lean in (True, False):
        torch.manual_seed(7)
        out[lean] = generate(model, tokenizer, ["What is 2 + 3?", "What is 7 * 38?"],
                             Sampling(max_new_tokens=12, samples_per_prompt=4, lean=lean))
    assert len(made) == 1  # the lean decoder ran once, in the first run
    assert torch.equal(out[True].input_ids, out[False].input_ids)


def test_static_step_reads_only_valid_slots():
    """The static step attends over the whole cache: what the unwritten slots hold must not count,
    and they start as zeros (uninitialized memory may hold NaN, and 0 x NaN survives a mask)."""
    model = random_model(LlamaConfig(**SHAPE))
    prompts, mask = torch.randint(3, 50, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    out = {}
    for mode in ("eager", "static"):
        lean = decoder.LeanDecoder(model, capacity=10, foldable=[], mode=mode)
        with torch.no_grad():
            lean.prefill(prompts, mask, 1)
            if mode == "static":
                for layer in lean.layers:
                    assert layer.keys[:, :, 4:].eq(0).all() and layer.values[:, :, 4:].eq(0).all()
                    layer.keys[:, :, 5:], layer.values[:, :, 5:] = 1e4, 1e4  # slot 4 is written by the step
            out[mode] = lean.step(torch.tensor([5, 6]))
    torch.testing.assert_close(out["static"], out["eager"], rtol=1e-5, atol=1e-5)


def test_the_replayable_step_samples_the_same_tokens_and_drops_rows_later(tiny_model_path):
    from grpo_cli.rollout.sampling import _decode_shared, eos_token_ids

    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    policy.model.eval()
    tokenizer = policy.tokenizer
    enc = tokenizer(["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0.", "What is 7 * 38?"], return_tensors="pt",
                    padding=True)
    tokens, keeps = {}, {}
    for mode in ("eager", "static"):
        lean = decoder.LeanDecoder(policy.model, enc["input_ids"].shape[1] + 40, [], mode)
        kept = []
        keep = lean.keep
        lean.keep = lambda rows: kept.append(len(rows)) or keep(rows)
        torch.manual_seed(7)
        with torch.no_grad():
            tokens[mode] = _decode_shared(lean, tokenizer, enc["input_ids"], enc["attention_mask"],
                                          Sampling(max_new_tokens=40, samples_per_prompt=6),
                                          eos_token_ids(policy.model, tokenizer)).tokens
        keeps[mode] = kept[1:]  # after the prefill's
    def completions(raw):  # each row through its first EOS; rows not yet dropped sample on after it
        return [row[: (row == 1).nonzero()[0].item() + 1 if (row == 1).any() else len(row)].tolist() for row in raw]

    assert tokenizer.convert_tokens_to_ids(tokenizer.eos_token) == 1
    assert completions(tokens["static"]) == completions(tokens["eager"])
    assert len(keeps["static"]) < len(keeps["eager"])  # each drop is a new capture: the replayable step waits
    assert all(after <= before / 2 for before, after in zip([18] + keeps["static"], keeps["static"]))


class Recording:
    """What a CUDA graph does, on the CPU: replay reruns the recorded step on the tensors it read at
    recording time and writes the result into the same output tensor."""

    made = 0

    def __init__(self, step):
        Recording.made += 1
        self.step, self.out = step, step()

    def replay(self):
        self.out.copy_(self.step())

    @staticmethod
    def record(step):
        recording = Recording(step)
        return recording, recording.out


@pytest.mark.parametrize("config", [Qwen2Config(**SHAPE), Qwen3Config(**QWEN3)], ids=["qwen2", "qwen3"])
def test_graph_mode_replays_the_recorded_step_on_its_inputs(monkeypatch, config):
    # The capture itself needs CUDA; this checks what the decoder does around it: inputs written in
    # place before each replay, one output tensor, a new recording after rows are dropped.
    monkeypatch.setattr(decoder.LeanDecoder, "record", staticmethod(Recording.record))
    Recording.made = 0
    model = random_model(config)
    prompts, mask = torch.randint(3, 50, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    steps, outputs = {}, []
    for mode in ("eager", "graph"):
        lean = decoder.LeanDecoder(model, capacity=14, foldable=[], mode=mode)
        rows = 6
        with torch.no_grad():
            steps[mode] = [lean.prefill(prompts, mask, 2).clone()]
            for t in range(7):
                logits = lean.step(torch.arange(rows) + t + 3)
                steps[mode].append(logits.clone())
                if mode == "graph":
                    outputs.append(logits)
                if t == 2:
                    lean.keep(torch.tensor([0, 2, 5]))
                    rows = 3
        assert lean.mode == mode
    for eager, graph in zip(steps["eager"], steps["graph"]):
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert Recording.made == 2  # once per batch size
    assert outputs[0] is outputs[2] and outputs[3] is outputs[6] and outputs[2] is not outputs[3]


def test_a_step_that_cannot_be_recorded_decodes_without_a_graph(monkeypatch):
    def refuse(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decoder.LeanDecoder, "record", staticmethod(refuse))
    model = random_model(LlamaConfig(**SHAPE))
    prompts, mask = torch.randint(3, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    logits = {}
    for mode in ("eager", "graph"):
        lean = decoder.LeanDecoder(model, capacity=9, foldable=[], mode=mode)
        with torch.no_grad():
            lean.prefill(prompts, mask, 1)
            if mode == "graph":
                with pytest.warns(UserWarning, match="decoding without CUDA graphs"):
                    lean.step(torch.tensor([4, 5]))
                assert lean.mode == "static"
            else:
                lean.step(torch.tensor([4, 5]))
            logits[mode] = lean.step(torch.tensor([6, 7]))
    torch.testing.assert_close(logits["graph"], logits["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("config", [Qwen2Config(**SHAPE), Qwen3Config(**QWEN3)], ids=["qwen2", "qwen3"])
def test_cuda_graph_decoding_draws_the_same_tokens_as_eager(config):
    model = random_model(config).cuda()
    prompts, mask = torch.randint(3, 50, (3, 6), device="cuda"), torch.ones(3, 6, dtype=torch.long, device="cuda")
    logits = {}
    for mode in ("eager", "graph"):
        lean = decoder.LeanDecoder(model, capacity=14, foldable=[], mode=mode)
        with torch.no_grad():
            steps = [lean.prefill(prompts, mask, 2)]
            for t in range(8):
                steps.append(lean.step(torch.arange(6, device="cuda") + t).clone())
                if t == 3:
                    lean.keep(torch.tensor([0, 2, 5], device="cuda"))  # recaptured at the new batch
        assert lean.mode == mode  # the capture did not fall back
        logits[mode] = steps
    for eager, graph in zip(logits["eager"], logits["graph"]):
        torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
