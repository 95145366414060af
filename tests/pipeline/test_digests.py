"""Digest values are persisted (manifests, the train identity, evaluate's caches, export's lineage):
these values were computed with the code before digests were shared (pipeline/digests.py), so a
refactor that changes an encoding fails here instead of silently re-running users' stages."""

from __future__ import annotations

import hashlib

from pipeline.config import PipelineConfig, config_slice
from pipeline.digests import digest_of, folder_digest
from pipeline.driver import manifest_digest
from pipeline.eval.identity import weights_digest
from pipeline.stages import train
from pipeline.stages.export import data_digests

VALUE = {"b": [1, "é", 2.5], "a": None, "c": {"z": True, "y": "x"}}


def write_run(root):
    (root / "prepare" / "dataset" / "train").mkdir(parents=True)
    (root / "prepare" / "dataset" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (root / "prepare" / "dataset" / "train" / "data-00000.arrow").write_bytes(b"\x00\x01arrow")
    (root / "prepare" / "manifest.json").write_text('{"stage": "prepare"}')
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "UORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    (adapter / "README.md").write_text("card")
    return adapter


def test_json_digests_keep_their_values():
    assert digest_of(VALUE) == "e29566667db0a91f14d719a409a67d000c5a112e167ee00cadecfcc311e9743b"  # configs
    assert digest_of(VALUE, compact=False) == (  # evaluate's answer/judgment cache keys
        "4a8cbd555448a068e3f7fd7eb5def21f5129be02ef3c716d5a03de7c42d15647"
    )


def test_file_and_folder_digests_keep_their_values(tmp_path):
    adapter = write_run(tmp_path)
    assert data_digests(tmp_path) == {
        "prepare/dataset": "319e97fe78dee5341ef47de03a5fc34661ba21000335a1bf2e586f9ccecb00f9"
    }
    assert folder_digest(adapter) == "4e1501b3719c2367a70179d2274f74b7a1a2472d06d5757349b4ba145144a988"
    # evaluate's tuned-model identity: weights, configs and template only (README.md is not in it)
    assert weights_digest(adapter) == "ee990dfbfb6ad01b8208dacaa5b7a4055b9cdd1310e5bf92e8c8f1a8d3b36a79"
    assert manifest_digest(tmp_path / "prepare") == (
        "6970b14113119da426a91c42933cde69213c09f2ec2af6d5e379c756cfb38a63"
    )
    assert manifest_digest(tmp_path / "nowhere") is None


def test_train_identity_is_the_config_digest_then_the_prepared_files(tmp_path):
    """The formula before the refactor, written out: a preempted run's checkpoints are found by it."""
    write_run(tmp_path)
    config = PipelineConfig.model_validate({"run": {"name": "d"}, "model": {"name_or_path": str(tmp_path)}})
    prepare = tmp_path / "prepare"
    expected = hashlib.sha256(digest_of(config_slice(config, train.CONFIG_SECTIONS)).encode())
    expected.update((prepare / "manifest.json").read_bytes())
    expected.update((prepare / "dataset" / "dataset_dict.json").read_bytes())
    assert train._identity(config, prepare) == expected.hexdigest()
