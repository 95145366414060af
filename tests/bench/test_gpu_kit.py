"""The GPU kit (benchmarks/gpu): its arithmetic, its batch search, its report, and the whole kit
rehearsed on the CPU with tiny shapes, so the one GPU call is never spent on a typo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import kit  # noqa: E402
import throughput  # noqa: E402


def test_flop_count_of_llama2_7b():
    """N from the shape equals Llama-2-7B's published parameter count less embeddings and norms;
    the FLOPs are the documented formula, by hand."""
    flops = throughput.base_flops(throughput.LLAMA2_7B, seq_len=1024)
    n = flops["params_linear"]
    embedding, norms = 32000 * 4096, 65 * 4096  # input embedding; 2 norms per layer + the final one
    assert n + embedding + norms == 6_738_415_616
    attention = 4 * 32 * 1024 * 4096
    assert flops["model"] == 4 * 6_607_077_376 + 3 * attention == 28_038_922_240
    assert flops["hardware"] == flops["model"] + 2 * 6_476_005_376 + attention


def test_the_7b_shape_is_the_plans_llama2_7b_config():
    """The throughput shape and `pipeline plan`'s offline Llama-2-7B config are one model."""
    shipped = json.loads((REPO / "configs" / "model_shapes" / "Llama-2-7b-hf" / "config.json").read_text())
    assert {key: shipped[key] for key in throughput.LLAMA2_7B} == throughput.LLAMA2_7B


def test_peak_of_known_cards():
    assert throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert throughput.peak_tflops("NVIDIA H200") == 989.4
    assert throughput.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert throughput.peak_tflops("Tesla T4") is None


@pytest.mark.parametrize("method", ["uora", "lora", "vera"])
def test_adapters_are_the_llama2_7b_section_with_method_and_rank_replaced(method):
    """Every method keeps the production config's dropout (0.05) under its own key, and only its own
    keys: LoRA takes none of UORA's, VeRA keeps the projection seed and d_initial UORA shares."""
    section = throughput.adapter_section(method, 1024).model_dump()
    shared = {"method": method, "r": 1024, "target_modules": "all-linear", "modules_to_save": None,
              f"{method}_dropout": 0.05}  # fmt: skip
    own = {"uora": {"projection_prng_key": 0, "d_initial": 0.1, "projection_init": "orthogonal",
                    "reinit_threshold": 1e-5, "reinit_alpha": 0.5, "reinit_patience": 1,
                    "reinit_target": "fixed", "reinit_seed": 0},
           "lora": {"lora_alpha": 2048},
           "vera": {"projection_prng_key": 0, "d_initial": 0.1, "save_projection": True}}[method]  # fmt: skip
    assert section == {**shared, **own}


class FakeOOM(Exception):
    pass


def fake_card(fits_up_to: int):
    """A step whose peak memory is 10 + 3·batch (GB) and that runs out of memory above ``fits_up_to``."""
    calls = []

    def step(batch: int) -> float:
        calls.append(batch)
        if batch > fits_up_to:
            raise FakeOOM
        return 0.1 * batch

    return step, calls


def test_batch_search_predicts_from_two_probes_and_backs_off():
    step, calls = fake_card(fits_up_to=24)
    peaks = iter([13, 16])  # after batch 1 and batch 2
    cleaned = []
    batch, seconds, notes = throughput.find_batch(
        step, lambda: next(peaks), 100, lambda s: 1000, FakeOOM, lambda: cleaned.append(1)
    )
    # 2 + (100 - 16) / 3 = 30 predicted; 30 runs out of memory, 24 = int(30 * 0.8) fits
    assert calls == [1, 2, 30, 24] and batch == 24 and seconds == pytest.approx(2.4)
    assert notes == {"predicted_fit": 30, "time_cap": 1000, "ooms": [30]} and cleaned == [1]


def test_batch_search_respects_the_time_cap_and_unknown_memory():
    step, calls = fake_card(fits_up_to=100)
    peaks = iter([13, 16])
    # the cap is given the batch-2 step's seconds (0.2 here)
    batch, _, notes = throughput.find_batch(
        step, lambda: next(peaks), 100, lambda s: int(s * 60), FakeOOM, list
    )
    assert batch == 12 and calls == [1, 2, 12] and notes["predicted_fit"] == 30
    step, calls = fake_card(fits_up_to=100)
    batch, _, notes = throughput.find_batch(step, lambda: 0, None, lambda s: 4, FakeOOM, list)
    assert batch == 4 and notes["predicted_fit"] is None


def test_report_table_and_failures():
    rows = [
        {
            "method": "uora",
            "r": 1024,
            "base": "bf16",
            "seq_len": 1024,
            "batch": 24,
            "tokens_per_s": 10234.4,
            "mfu_pct": 41.23,
            "peak_gib": 71.26,
            "status": "ok",
            "seconds_per_step": 2.4,
            "hfu_pct": 60.0,
            "trainable_params": 1_600_000,
            "predicted_fit": 40,
            "time_cap": 24,
            "ooms": [],
            "flops_per_token": {"model": 28e9, "hardware": 41.5e9, "params_linear": 6.6e9},
            "peak_tflops": 989.4,
        },
        {"method": "lora", "r": 64, "base": "int8", "seq_len": 1024, "status": "not run: time budget"},
    ]
    results = {
        "mode": "GPU",
        "device": "NVIDIA H200",
        "started": "now",
        "commit": None,
        "seconds": 400,
        "environment": {},
        "throughput": rows,
        "parts": {
            "tests": {
                "status": "failed",
                "seconds": 80,
                "counts": {"passed": 9, "failed": 1},
                "cases": [
                    {
                        "name": "tests/gpu/test_x.py::test_y",
                        "outcome": "failed",
                        "lines": ["AssertionError: A is torch.bfloat16"],
                    }
                ],
            }
        },
    }
    text = kit.report(results)
    lines = text.splitlines()
    assert lines.count(kit.HEADER) == 1
    table = lines[lines.index(kit.HEADER) + 2 : lines.index(kit.HEADER) + 4]
    assert table == [
        "| uora | 1024 | bf16 | 1024 | 24 | 10234 | 41.2 | 71.3 |",
        "| lora | 64 | int8 | 1024 | - | not run: time budget | - | - |",
    ]
    assert "- (a) `tests/gpu/test_x.py::test_y` failed: AssertionError: A is torch.bfloat16" in lines
    assert any(
        line.startswith("| (b) pipeline") and line.endswith("| not run: deadline | | |") for line in lines
    )
    assert "| uora | 1024 | bf16 | time cap | 40 | 0 | 2.4 | 60.0 | 1,600,000 |" in lines
    assert kit._slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


def test_junit_failures_keep_the_assertion_lines(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.gpu.t" name="test_a" file="tests/gpu/t.py" '
        'time="1.5"><failure message="assert 1 == 2">def test_a():\n&gt;  assert 1 == 2\n'
        "E   assert 1 == 2\nE    +  where</failure></testcase>"
        '<testcase classname="tests.gpu.t" name="test_b" file="tests/gpu/t.py" time="0.1">'
        '<skipped message="needs a CUDA GPU" /></testcase></testsuite></testsuites>'
    )
    assert kit._junit_cases(xml) == [
        {
            "name": "tests/gpu/t.py::test_a",
            "outcome": "failed",
            "seconds": 1.5,
            "lines": ["assert 1 == 2", "+  where"],
        },
        {
            "name": "tests/gpu/t.py::test_b",
            "outcome": "skipped",
            "seconds": 0.1,
            "lines": ["needs a CUDA GPU"],
        },
    ]


@pytest.mark.slow
def test_rehearsal_runs_every_part_and_writes_a_wellformed_report(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "KIT_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    before = sorted((REPO / "benchmarks" / "results").glob("gpu_*.md"))
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--rehearse"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    # what comes back from a GPU host: at most 8 files, plain names
    assert files == [
        "env.log",
        "gpu_cpu_rehearsal.md",
        "pipeline.log",
        "pytest.log",
        "results.json",
        "run.log",
        "throughput.log",
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    results = json.loads((out / "results.json").read_text())
    assert {name: part["status"] for name, part in results["parts"].items()} == {
        "tests": "passed",
        "pipeline": "passed",
        "throughput": "passed",
    }
    tests = results["parts"]["tests"]
    assert tests["counts"]["passed"] >= 10 and not tests["counts"].get("skipped")  # CPU mode ran them all
    stages = results["parts"]["pipeline"]["summary"]["stages"]
    assert [stages[s]["status"] for s in ("prepare", "train", "export")] == ["ran"] * 3
    assert results["parts"]["pipeline"]["summary"]["export_verification"]["passed"] is True
    report = (out / "gpu_cpu_rehearsal.md").read_text().splitlines()
    start = report.index(kit.HEADER) + 2
    rows = report[start : start + 8]
    pattern = r"\| (uora|vera|lora) \| \d+ \| (bf16|int8) \| 64 \| \d+ \| \d+ \| - \| - \|"
    assert len(rows) == 8 and all(re.fullmatch(pattern, row) for row in rows), rows
    assert {(r.split(" | ")[0][2:], r.split(" | ")[2]) for r in rows} == {
        (m, b) for m in ("uora", "vera", "lora") for b in ("bf16", "int8")
    }
    assert "MLflow:   off (tracking.enabled: false)" in (out / "pipeline.log").read_text()
    assert (
        sorted((REPO / "benchmarks" / "results").glob("gpu_*.md")) == before
    )  # a rehearsal publishes nothing
