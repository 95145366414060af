"""slurm/train.sh and slurm/pipeline.sh with the real pipeline, on the two-node test cluster.

A tiny config (2-layer random Llama with SmolLM2's tokenizer, UORA on q/v, a few optimizer
steps, CPU): data are prepared once and copied into each run directory (the prepare stage's
identity does not include the run name, so the driver treats the copies as up to date).

- the multi-node run under Slurm (2 nodes x 1 process, c10d rendezvous) writes an adapter equal
  within 1e-6 to the same training without Slurm (one standalone torchrun with 2 processes);
- `scancel --signal=USR1` mid-run: the workers checkpoint, the job requeues itself, resumes and
  finishes with an adapter bit-identical to the uninterrupted Slurm run;
- `sbatch slurm/pipeline.sh` runs every stage to the end.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm.conftest import REPO_ROOT, SlurmCluster

pytestmark = pytest.mark.slow

TRAIN_SH = REPO_ROOT / "slurm" / "train.sh"
PIPELINE_SH = REPO_ROOT / "slurm" / "pipeline.sh"


def tiny_config(root: Path, model_dir: Path) -> dict:
    return {
        "run": {"name": "prepared", "output_dir": str(root / "runs"), "seed": 7},
        "model": {"name_or_path": str(model_dir)},
        "data": {"sources": [{"builtin": 40}], "eval_size": 8, "max_length": 256},
        "adapter": {"method": "uora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "max_steps": 8,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 4,
            "max_length": 64,
            "logging_steps": 1,
            "save_steps": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 0.0,
            "max_grad_norm": 0.0,
            "omp_num_threads": 1,
        },
        # The smallest real evaluation: one hand-written and one verifiable question, 4 tokens,
        # the tiny model as its own judge (rating by logits).
        "eval": {
            "questions": "builtin",
            "question_ids": [2, 1001],
            "max_new_tokens": 4,
            "judge": {"backend": "local", "local_scoring": "logits"},
        },
        "export": {"verify_prompts": 1, "verify_max_tokens": 16},
    }


class Tiny:
    """The tiny config, its prepared data, and fresh run directories that reuse them."""

    def __init__(self, root: Path, config: Path):
        self.root = root
        self.config = config

    def new_run(self, name: str) -> Path:
        run_dir = self.root / "runs" / name
        shutil.copytree(self.root / "runs" / "prepared" / "prepare", run_dir / "prepare")
        return run_dir


def python_pipeline(cluster: SlurmCluster, *args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], env=cluster.env, cwd=cwd,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"python -m pipeline {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, slurm_cluster: SlurmCluster) -> Tiny:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("slurm-tiny")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root, root / "model"), sort_keys=False))
    python_pipeline(slurm_cluster, "prepare", str(config), cwd=root)
    return Tiny(root, config)


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    path = run_dir / "train" / "adapter" / "adapter_model.safetensors"
    assert path.is_file(), f"no adapter at {path}"
    return load_file(str(path))


@pytest.fixture(scope="module")
def without_slurm(tiny: Tiny, slurm_cluster: SlurmCluster) -> Path:
    """The same training, no Slurm: `python -m pipeline train` with one torchrun of 2 processes."""
    run_dir = tiny.new_run("local")
    python_pipeline(
        slurm_cluster, "train", str(tiny.config), "run.name=local", "train.nproc_per_node=2", cwd=tiny.root
    )
    return run_dir


@pytest.fixture(scope="module")
def on_slurm(tiny: Tiny, slurm_cluster: SlurmCluster):
    """The uninterrupted run on Slurm: the whole pipeline through `sbatch slurm/pipeline.sh`."""
    run_dir = tiny.new_run("slurm")
    job_id = slurm_cluster.sbatch("--gpus-per-node=0", str(PIPELINE_SH), str(tiny.config), "run.name=slurm",
                                  cwd=tiny.root)  # fmt: skip
    return run_dir, slurm_cluster.wait(job_id, timeout=600)


def test_pipeline_sh_runs_every_stage(on_slurm):
    run_dir, job = on_slurm
    log = job.log_text()
    assert job.log == run_dir.parents[1] / f"uora-pipeline-{job.id}.out"  # <job name>-<id>.out, submit dir
    assert "0: node 0" in log and "1: node 1" in log  # one torchrun on each of the two nodes
    # The head address comes from the node list: n1's NodeAddr ("n1" itself resolves nowhere).
    assert "rendezvous 127.0.0.1:" in log
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", "0:0", 0), log
    for stage in ("prepare", "train", "evaluate", "export"):
        assert (run_dir / stage / "manifest.json").is_file(), f"{stage} did not finish:\n{log}"
    assert (run_dir / "train" / "DONE").is_file()
    assert (run_dir / "evaluate" / "results.json").is_file()
    assert (run_dir / "export" / "merged").is_dir()


def test_two_slurm_nodes_equal_the_run_without_slurm(on_slurm, without_slurm: Path):
    import torch

    run_dir, job = on_slurm
    assert (run_dir / "train" / "DONE").is_file(), job.log_text()
    slurm, local = adapter_tensors(run_dir), adapter_tensors(without_slurm)
    assert slurm.keys() == local.keys() and slurm
    for name in slurm:
        torch.testing.assert_close(slurm[name], local[name], rtol=0, atol=1e-6, msg=name)


def test_usr1_mid_run_requeues_and_resumes_bit_identically(tiny: Tiny, slurm_cluster: SlurmCluster, on_slurm):
    import torch

    reference_dir, _ = on_slurm
    run_dir = tiny.new_run("preempted")
    job_id = slurm_cluster.sbatch("--gpus-per-node=0", str(TRAIN_SH), str(tiny.config), "run.name=preempted",
                                  cwd=tiny.root)  # fmt: skip
    first = run_dir / "train.partial" / "checkpoints" / "checkpoint-2"
    deadline = time.monotonic() + 300
    while not first.is_dir():
        assert time.monotonic() < deadline, slurm_cluster.job(job_id).log_text()
        time.sleep(0.2)
    assert slurm_cluster.run("scancel", "--signal=USR1", job_id).returncode == 0
    job = slurm_cluster.wait(job_id, timeout=600)
    log = job.log_text()
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", "0:0", 1), log
    assert "training preempted" in log and "requeueing job" in log and "training complete" in log
    assert (run_dir / "train" / "DONE").is_file()
    resumed, uninterrupted = adapter_tensors(run_dir), adapter_tensors(reference_dir)
    assert resumed.keys() == uninterrupted.keys() and resumed
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
