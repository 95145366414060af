"""Without the hub: one probe, one line, no run directory; cached weights switch to offline mode;
`validate` warns about what a run would trip over."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ModelConfig
from pipeline.models import hub_preflight
from tests.pipeline.test_config import VALIDATE_PROBE

REPO = Path(__file__).resolve().parents[2]
DEAD_HUB = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused at once


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    return {**env, "HF_ENDPOINT": DEAD_HUB, "HF_HUB_CACHE": str(tmp_path / "hub"), **extra}


def write_config(tmp_path: Path, judge: str = "{backend: local}") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{name: r, output_dir: {tmp_path / 'runs'}}}\n"
                    "model: {name_or_path: org/absent}\n"
                    f"data: {{sources: [{{builtin: 20}}]}}\neval: {{judge: {judge}}}\n")  # fmt: skip
    return path


def test_unreachable_hub_fails_in_one_line_and_leaves_no_run_dir(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pipeline", "prepare", str(write_config(tmp_path))], cwd=REPO,
                         env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"model.name_or_path: org/absent is not in the local Hugging Face cache and the hub ({DEAD_HUB}) is "
        "unreachable ([Errno 111] Connection refused); download it where the hub is reachable, or point "
        "HF_HUB_CACHE at a cache that has it"
    ]
    assert not (tmp_path / "runs").exists()


def test_cached_weights_switch_the_process_to_offline_mode(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for name, value in offline_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    names = ("org/cached", "org/absent", str(tmp_path))
    cached, absent, local = (ModelConfig(name_or_path=name) for name in names)
    # every hub model is checked after the one probe: the judge's too
    assert hub_preflight({"model": cached, "eval.judge.local_model": absent}) == (
        f"eval.judge.local_model.name_or_path: org/absent is not in the local Hugging Face cache and the hub "
        f"({DEAD_HUB}) is unreachable ([Errno 111] Connection refused); download it where the hub is "
        "reachable, or point HF_HUB_CACHE at a cache that has it"
    )
    # transformers and huggingface_hub now read the cache at once instead of retrying the hub
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is True
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub_preflight({"model": cached}) is None  # hub down, weights cached: the run goes on offline
    assert hub_preflight({"model": local}) is None  # local weights: nothing to probe


@pytest.mark.parametrize("key_set", [False, True])
def test_validate_warns_about_an_unset_judge_key_and_uncached_weights(tmp_path, key_set):
    config = write_config(tmp_path, "{backend: openai, model: gpt-4, api_key_env: UORA_TEST_JUDGE_KEY}")
    env = {k: v for k, v in offline_env(tmp_path).items() if k != "UORA_TEST_JUDGE_KEY"}
    env.update({"UORA_TEST_JUDGE_KEY": "sk-x"} if key_set else {})
    run = subprocess.run([sys.executable, "-c", VALIDATE_PROBE, str(config)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    _, code, heavy, _ = next(line for line in run.stdout.splitlines() if line.startswith("RESULT")).split()
    assert (code, heavy) == ("0", "-")  # warnings only; still no torch, no network
    expected = [
        "warning: model.name_or_path: org/absent is not in the local Hugging Face cache; the first stage "
        "downloads it (gated models such as Llama-2: accept the licence on the hub, then set HF_TOKEN or run "
        "hf auth login)"
    ]
    if not key_set:
        unset = "warning: eval.judge.api_key_env: $UORA_TEST_JUDGE_KEY is not set; evaluate fails until it is"
        expected.insert(0, unset)
    assert run.stderr.splitlines() == expected
    assert not (tmp_path / "runs").exists()
