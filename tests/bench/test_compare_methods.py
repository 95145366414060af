"""benchmarks/compare_methods.py end to end on a tiny model (--quick), so the script cannot rot:
every method runs through the pipeline's own prepare/train/evaluate, the tables and the plot are
written, a rerun resumes instead of retraining, and bad settings fail in one line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks import compare_methods as cm

pytestmark = pytest.mark.slow

# The headline methods (one per family, and the three the goals compare): seven cells
# would take minutes even on a tiny model, as every cell is a full pipeline run in its own process.
METHODS = ["lora_r8", "vera_r1024", "uora_r64"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tiny_model_dir, shared_data):
    """One --quick comparison on the tiny model, with a README whose results section it rewrites."""
    import yaml

    root = tmp_path_factory.mktemp("compare")
    settings = yaml.safe_load(cm.SETTINGS.read_text())
    # One ablation instead of the default three; the quick section must not switch it off.
    settings["ablations"] = {"uora_r64": {"d_initial_1": {"d_initial": 1.0}}}
    settings["quick"].pop("ablations")
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    readme = root / "README.md"
    readme.write_text(f"# x\n\n{cm.README_START}\nold results\n{cm.README_END}\n\nafter\n")
    argv = ["--quick", "--settings", str(root / "settings.yaml"), "--methods", ",".join(METHODS),
            "--model", str(tiny_model_dir),
            "--data-dir", str(shared_data), "--work", str(root / "work"), "--out", str(root / "out"),
            "--readme", str(readme)]  # fmt: skip
    assert cm.main(argv) == 0
    return root, argv


def test_every_method_is_measured(quick_run):
    root, _ = quick_run
    rows = read_csv(root / "out" / "compare_methods_quick.csv")
    assert [row["method"] for row in rows] == ["baseline", *METHODS]
    by = {row["method"]: row for row in rows}
    params = {name: int(float(by[name]["trainable_params"])) for name in METHODS}
    # Tiny Llama, 2 layers, all linear layers: (in, out) of q, k, v, o, gate, up, down.
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    assert params["lora_r8"] == 2 * sum(8 * (i + o) for i, o in shapes)  # A: r x in, B: out x r
    assert params["uora_r64"] == 2 * sum(64 + o for _, o in shapes)  # d: r, b: out
    assert params["vera_r1024"] == 2 * sum(1024 + o for _, o in shapes)
    assert by["baseline"]["trainable_params"] == "0"
    for name in METHODS:
        row = by[name]
        for key in ("loss_roleplay", "loss_gsm8k", "loss_mean", "train_s", "peak_rss_mb", "adapter_mb"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (name, key)
        assert float(row["loss_mean"]) == pytest.approx(
            (float(row["loss_roleplay"]) + float(row["loss_gsm8k"])) / 2
        )
        assert 0.0 <= float(row["gsm8k_em"]) <= 1.0
        assert 1.0 <= float(row["mt_bench"]) <= 10.0
    assert float(by["uora_r64"]["reinit_events"]) >= 0 and by["lora_r8"]["reinit_events"] == ""
    # The untrained baseline: evaluated on its own, its loss is the adapters' loss before step 1.
    assert math.isfinite(float(by["baseline"]["loss_mean"])) and by["baseline"]["mt_bench"]
    assert float(by["baseline"]["loss_mean_init_spread"]) < 1e-4  # every adapter starts at ΔW = 0


def test_rows_are_read_from_mlflow_and_match_the_stage_outputs(quick_run):
    """The rows come from the cells' MLflow store; each equals what its run directory recorded."""
    root, _ = quick_run
    rows = read_csv(root / "out" / "compare_methods_quick.csv")
    assert (root / "work" / "mlflow.db").is_file()
    for row in rows[1:]:
        run = root / "work" / "runs" / f"{row['method']}-lr{float(row['learning_rate']):g}-s0"
        metrics = json.loads((run / "train" / "metrics.json").read_text())
        history = json.loads((run / "train" / "log_history.json").read_text())
        start_eval = sum(value for entry in history if entry.get("step") == 0 for key, value in entry.items()
                         if key.startswith("eval_") and key.endswith("_runtime"))  # fmt: skip
        assert start_eval > 0  # the quick cells evaluate before step 1: the subtraction is exercised
        assert float(row["loss_mean"]) == metrics["eval_loss_after"]
        assert float(row["loss_gsm8k"]) == metrics["eval_loss_after.gsm8k"]
        assert float(row["train_s"]) == pytest.approx(metrics["train_runtime_s"] - start_eval)
        tuned = json.loads((run / "evaluate" / "results.json").read_text())["models"]["tuned"]
        assert float(row["gsm8k_em"]) == tuned["exact_match_categories"]["gsm8k"]
        assert float(row["mt_bench"]) == tuned["score_overall"]


def test_tables_plot_and_readme(quick_run):
    root, _ = quick_run
    out = root / "out"
    sweep = read_csv(out / "compare_methods_quick_sweep.csv")
    assert [row["method"] for row in sweep] == METHODS and all(row["chosen"] == "True" for row in sweep)
    report = (out / "compare_methods_quick.md").read_text()
    assert "| uora_r64 |" in report and "## Learning-rate sweep" in report
    assert "small-judge score" in report and "UORA r=64 held-out loss within 2% of LoRA r=8's" in report
    assert "step time, UORA r=64 / VeRA r=1024:" in report
    assert (out / "compare_methods_quick.png").stat().st_size > 10_000
    readme = (root / "README.md").read_text()
    assert "old results" not in readme and readme.endswith(f"{cm.README_END}\n\nafter\n")
    assert (
        "| baseline |" in readme
        and "![quality vs trainable parameters](out/compare_methods_quick.png)" in readme
    )


def test_a_rerun_resumes_without_retraining(quick_run, capsys):
    root, argv = quick_run
    rate = cm.sweep_rates(cm.load_settings(cm.SETTINGS, quick=True), "uora_r64")[0]
    adapter = (
        root / "work" / "runs" / f"uora_r64-lr{rate:g}-s0" / "train" / "adapter" / "adapter_model.safetensors"
    )
    before = adapter.stat().st_mtime_ns
    assert cm.main(argv) == 0
    assert adapter.stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert printed.count("(skipped)") == 1 + len(METHODS) + 1  # every cell once, and the ablation
    assert "UORA r=64 held-out loss" in printed  # and the results are reported again


def test_bad_settings_fail_in_one_line(tmp_path, capsys):
    settings = tmp_path / "s.yaml"
    text = cm.SETTINGS.read_text().replace("headline: [lora_r8, vera_r1024, uora_r64]", "headline: [lora_r9]")
    settings.write_text(text)
    assert cm.main(["--settings", str(settings)]) == 2
    assert (
        capsys.readouterr().err
        == f"compare_methods: {settings}: headline: ['lora_r9'] are not among methods\n"
    )
    assert cm.main(["--methods", "dora_r8"]) == 2
    assert "--methods: unknown ['dora_r8']" in capsys.readouterr().err
    assert cm.main(["--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"compare_methods: data_dir: {tmp_path}/instruct/gpteacher_roleplay.json not found"
    )


def test_ablations_change_only_their_adapter_setting(quick_run):
    root, _ = quick_run
    rows = read_csv(root / "out" / "compare_methods_quick_ablations.csv")
    assert [(row["method"], row["variant"]) for row in rows] == [
        ("uora_r64", "as configured"),
        ("uora_r64", "d_initial_1"),
    ]
    plain, variant = rows
    assert (
        variant["learning_rate"] == plain["learning_rate"]
        and variant["trainable_params"] == plain["trainable_params"]
    )
    assert variant["loss_mean"] != plain["loss_mean"]  # a 10x larger d moves the model differently
    import yaml

    config = yaml.safe_load(
        (
            root / "work" / "configs" / f"uora_r64-d_initial_1-lr{float(plain['learning_rate']):g}-s0.yaml"
        ).read_text()
    )
    assert config["adapter"]["d_initial"] == 1.0 and config["adapter"]["r"] == 64
    assert "## Ablations" in (root / "out" / "compare_methods_quick.md").read_text()


def test_a_sweep_is_extended_only_past_the_edge_holding_the_best_rate():
    def rows(*pairs):
        return [{"learning_rate": rate, "loss_mean": loss} for rate, loss in pairs]

    assert cm.extended_rate(rows((1e-3, 2.0), (3e-3, 1.9))) == 0.009  # best is the largest: go up
    assert cm.extended_rate(rows((1e-3, 1.8), (3e-3, 1.9), (1e-2, 2.5))) == pytest.approx(3.33e-4)
    assert cm.extended_rate(rows((1e-3, 2.0), (3e-3, 1.7), (1e-2, 1.9))) is None  # bracketed
