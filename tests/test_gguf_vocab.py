"""gguf_vocab.py: a tokenizer as GGUF's tokenizer fields. SentencePiece-style vocabularies are checked against a
model trained by sentencepiece itself and turned into a tokenizer by transformers, as Llama 2's and Mistral
7B's tokenizer.json files were made, and tokenized by llama.cpp itself."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import gguf
import pytest
import torch

from grpo_cli.errors import UserError
from grpo_cli.export.gguf_file import write_gguf
from grpo_cli.export.gguf_vocab import read_vocabulary
from test_gguf_export import require_llama_cpp

ROOT = Path(__file__).resolve().parents[1]
SPACE = "\u2581"
# Llama 2's chat layout: the BOS as text, then plain-text markers; and ChatML, whose markers are special tokens
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                   "{{ '<<SYS>> ' + m['content'] + ' <</SYS>> ' }}{% elif m['role'] == 'user' %}"
                   "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                   "{% endif %}{% endfor %}")
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["What is 12 + 30? Give the answer.", "Hello world's 1234567 it's  double  spaces\n\n\nnewlines \u00c4\u00d6 "
         "\u6f22\u5b57 can't, 3.14159!", (ROOT / "docs" / "algorithm.md").read_text()[:3000]]


def handmade(merges: list[str], vocab: dict[str, int], normalizer=None, pre_tokenizer=None):
    """A tokenizers BPE with byte fallback, as transformers writes SentencePiece vocabularies."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], byte_fallback=True,
                                   unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


HANDMADE_VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, SPACE: 4, "a": 5, "b": 6, f"{SPACE}a": 7, "ab": 8,
                  f"{SPACE}ab": 9}
# every pair of pieces that joins into a piece is a merge, ranked by the joined piece, as transformers converts
HANDMADE_MERGES = [f"{SPACE} a", "a b", f"{SPACE}a b", f"{SPACE} ab"]


def metaspace(scheme: str, split: bool = False):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=split)


def tiny_llama(tokenizer, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()


def test_scores_are_minus_the_first_merge_s_rank_and_byte_tokens_are_typed(tmp_path):
    from tokenizers import normalizers

    tokenizer = handmade(HANDMADE_MERGES, HANDMADE_VOCAB, normalizer=normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]))
    vocabulary = read_vocabulary(tokenizer)
    assert vocabulary.model == "llama" and vocabulary.space_prefix  # Prepend: before every stretch of text
    # '\u2581a' is made by merge 0, 'ab' by merge 1, '\u2581ab' first by merge 2 (and again by merge 3)
    assert vocabulary.scores == {7: -0.0, 8: -1.0, 9: -2.0}
    path = tmp_path / "hand.gguf"
    write_gguf(tiny_llama(tokenizer), tokenizer, path, "f32", "hand", "default", vocabulary)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.scores"].contents() == [0.0] * 7 + [0.0, -1.0, -2.0]
    types = fields["tokenizer.ggml.token_type"].contents()
    T = gguf.TokenType
    assert types == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE] + [T.NORMAL] * 6
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert fields["tokenizer.ggml.unknown_token_id"].contents() == 0
    assert "tokenizer.ggml.merges" not in fields  # llama.cpp's SentencePiece tokenizer goes by the scores


@pytest.mark.parametrize("scheme, prompt, prefix", [
    ("always", None, True), ("never", None, False),
    ("first", "<s>[INST] hi [/INST]", False),  # no '\u2581' anywhere in a prompt that opens with a special token
    ("first", "What is 2 + 2?", True)])  # ... but at the start of one that does not
def test_where_the_space_goes_follows_the_tokenizer_and_training_s_prompt(scheme, prompt, prefix):
    tokenizer = handmade(HANDMADE_MERGES, HANDMADE_VOCAB, pre_tokenizer=metaspace(scheme))
    assert read_vocabulary(tokenizer, prompt=prompt).space_prefix is prefix


def test_what_llama_cpp_s_sentencepiece_tokenizer_cannot_do_is_refused_by_name(tmp_path):
    from tokenizers import normalizers, pre_tokenizers

    # 'bc' is a token but 'b' + 'c' no merge: transformers never makes 'bc' where llama.cpp would
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "ab": 6, "bc": 7}
    with pytest.raises(UserError, match="merges are not SentencePiece's: 'b' \\+ 'c' make the token 'bc'"):
        read_vocabulary(handmade(["a b"], vocab))
    with pytest.raises(UserError, match="normalizer has a NFKC step"):
        read_vocabulary(handmade(HANDMADE_MERGES, HANDMADE_VOCAB, normalizer=normalizers.NFKC()))
    with pytest.raises(UserError, match="Whitespace pre-tokenizer"):
        read_vocabulary(handmade(HANDMADE_MERGES, HANDMADE_VOCAB, pre_tokenizer=pre_tokenizers.Whitespace()))
    spanning = dict(HANDMADE_VOCAB, **{f"a{SPACE}": 10})
    with pytest.raises(UserError, match="split: true\\) and has tokens that span one"):
        read_vocabulary(handmade([*HANDMADE_MERGES, f"a {SPACE}"], spanning, pre_tokenizer=metaspace("always", True)))
    # splitting at spaces changes nothing where no token spans one
    assert read_vocabulary(handmade(HANDMADE_MERGES, HANDMADE_VOCAB, pre_tokenizer=metaspace("always", True)))


def test_a_tokenizer_that_is_not_bpe_is_refused_before_the_file_opens(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(UserError, match="covers BPE tokenizers"):
        write_gguf(model, AutoTokenizer.from_pretrained(tiny_model_path), tmp_path / "tiny.gguf", "f16", "tiny",
                   pre="default")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A BPE SentencePiece model with byte fallback, trained by sentencepiece on this project's docs (as
    Llama 2's was, on more text), saved as tokenizer.model."""
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("needs sentencepiece: pip install -e '.[test]'")
    import sentencepiece

    lines = [line for page in ("README.md", "docs/algorithm.md", "docs/export.md")
             for line in (ROOT / page).read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=1000,
                                             model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                             hard_vocab_limit=False, minloglevel=2)
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def sentencepiece_tokenizer(folder: Path, shape: str, template: str):
    """transformers' tokenizer for the SentencePiece model: "first" and "always" are Metaspace's schemes
    (transformers 5's LlamaTokenizer with legacy False / True); "prepend" is the normalizer that tokenizer.json
    files written by earlier transformers carry (Llama 2's, Mistral 7B v0.1's)."""
    from tokenizers import Tokenizer
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=shape == "always")
    if shape == "prepend":
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        state["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]}
        state["pre_tokenizer"] = None
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<s>",
                                            eos_token="</s>", unk_token="<unk>")
    if template == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = {"llama2": LLAMA2_TEMPLATE, "chatml": CHATML_TEMPLATE}[template]
    return tokenizer


def chat_prompts(tokenizer) -> list[str]:
    """TEXTS as user messages, rendered by the tokenizer's chat template with the assistant's turn opened."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True) for text in TEXTS]


def llama_cpp_ids(tokenizer, vocabulary, texts: list[str], path: Path) -> list[list[int]]:
    """`texts` tokenized by llama.cpp from a GGUF file of `tokenizer` (special tokens parsed, no BOS added)."""
    from llama_cpp import Llama

    write_gguf(tiny_llama(tokenizer), tokenizer, path, "f32", "spm", "default", vocabulary)
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
    finally:
        llm.close()


@pytest.mark.parametrize("shape", ["first", "always", "prepend"])
@pytest.mark.parametrize("template", ["llama2", "chatml", None])
def test_llama_cpp_tokenizes_training_s_prompts_as_transformers_does(sentencepiece_model, shape, template, tmp_path):
    """Every prompt (a question, text with runs of spaces, digits and letters outside the vocabulary, a page of
    docs), as a chat template renders it or as plain text, gives training's token ids in llama.cpp, for each
    way transformers writes the leading space."""
    require_llama_cpp()
    tokenizer = sentencepiece_tokenizer(sentencepiece_model, shape, template or "llama2")
    prompts = TEXTS if template is None else chat_prompts(tokenizer)
    vocabulary = read_vocabulary(tokenizer, prompt=prompts[0])
    assert vocabulary.model == "llama" and len(vocabulary.scores) > 500
    ours = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    assert any(token.startswith("<0x") for token in tokenizer.convert_ids_to_tokens(ours[1]))  # byte fallback
    assert llama_cpp_ids(tokenizer, vocabulary, prompts, tmp_path / "spm.gguf") == ours


@pytest.fixture(scope="module")
def sentencepiece_run(sentencepiece_model, tmp_path_factory) -> Path:
    """A small Llama with the SentencePiece vocabulary and Llama 2's chat layout (transformers 5's tokenizer for
    it: Metaspace, "first"), trained two steps with LoRA at a high learning rate."""
    from conftest import smollm2_recipe
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.run.console import TrainConsole
    from grpo_cli.run.train import train

    tokenizer = sentencepiece_tokenizer(sentencepiece_model, "first", "llama2")
    model_dir = tmp_path_factory.mktemp("spm-llama")
    tiny_llama(tokenizer, layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run_dir = model_dir.parent / "spm-run"
    recipe = smollm2_recipe(run_dir, "Answer briefly.", model={"name": str(model_dir), "lora": {"r": 8, "alpha": 16}},
                            grpo={"kl_beta": 0.0}, train={"lr": 5e-2, "seed": 0})
    train(recipe_module.validate(recipe), console=TrainConsole(quiet=True))
    return run_dir


@pytest.mark.parametrize("verifier, by", [("llama.cpp", "llama.cpp (llama-cpp-python"),
                                         ("transformers", "transformers' GGUF reader")])
def test_a_model_with_a_sentencepiece_vocabulary_exports_and_is_verified(sentencepiece_run, verifier, by, tmp_path):
    """The whole path from the command line: exported to GGUF and checked by llama.cpp, and by transformers'
    reader (tokens, chat formatting, distributions, greedy continuations)."""
    if verifier == "llama.cpp":
        require_llama_cpp()
    from typer.testing import CliRunner

    from grpo_cli.cli import app

    out = tmp_path / "gguf" / "spm"
    result = CliRunner().invoke(app, ["export", str(sentencepiece_run), "--out", str(out), "--format", "gguf",
                                      "--verifier", verifier])
    assert result.exit_code == 0, result.output
    assert f"by {by}" in " ".join(result.output.split())
    fields = gguf.GGUFReader(out / "spm-f16.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False  # Llama 2's prompts open with <s>
    assert f"Verified after writing, by {by}" in (out / "README.md").read_text()


def test_a_space_where_training_had_none_fails_the_token_check_and_says_why(sentencepiece_run, tmp_path,
                                                                           monkeypatch):
    """The space prefix written wrong on purpose: llama.cpp would prompt the model with an extra '\u2581' after
    <s>; the export fails, says where and why, and leaves nothing."""
    require_llama_cpp()
    from dataclasses import replace

    from grpo_cli.export import gguf_format
    from grpo_cli.export.build import export

    read = gguf_format.read_vocabulary
    monkeypatch.setattr(gguf_format, "read_vocabulary",
                        lambda *a, **k: replace(read(*a, **k), space_prefix=True))
    with pytest.raises(UserError, match="splits '<s><<SYS>> Answer.*add_space_prefix true here") as failed:
        export(str(sentencepiece_run), tmp_path / "spm", format="gguf")
    assert "Nothing was written" in str(failed.value)
    assert not (tmp_path / "spm").exists()


def test_a_sentencepiece_vocabulary_read_from_gguf_by_transformers_is_written_back_faithfully(sentencepiece_model,
                                                                                           tmp_path):
    """A run that starts from a GGUF file with a SentencePiece vocabulary (TinyLlama's, Llama 2's) trains with
    the tokenizer transformers builds from it: written back, llama.cpp tokenizes chat prompts as that did."""
    require_llama_cpp()
    from transformers import AutoTokenizer

    tokenizer = sentencepiece_tokenizer(sentencepiece_model, "first", "llama2")
    source = tmp_path / "source"
    source.mkdir()
    write_gguf(tiny_llama(tokenizer), tokenizer, source / "spm.gguf", "f32", "spm", "default")
    read_back = AutoTokenizer.from_pretrained(source, gguf_file="spm.gguf")
    read_back.chat_template = LLAMA2_TEMPLATE
    prompts = chat_prompts(read_back)
    vocabulary = read_vocabulary(read_back, prompt=prompts[0])
    assert vocabulary.model == "llama"
    ours = [read_back(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    assert llama_cpp_ids(read_back, vocabulary, prompts, tmp_path / "again.gguf") == ours

