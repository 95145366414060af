"""Does UORA deliver? UORA vs LoRA vs VeRA (and no training) on the same data, steps and seeds.

Every cell is an ordinary pipeline run (``prepare`` → ``train`` → ``evaluate``) in its own run
directory under ``--work``, built from ``base_config`` (the CPU default: SmolLM2-135M-Instruct)
plus the overrides in ``benchmarks/compare_methods.yaml``:

- data: a fixed mix of GPTeacher role-play and GSM8K (Alpaca format, ../shared/data/instruct),
  with a fixed held-out slice of each source (``data.sources[*].eval_samples``, by ``data.seed``)
  that no run trains on;
- learning rate: each method's sweep runs at seed 0 and the lowest mean held-out loss wins;
  headline methods then run every seed at that rate;
- metrics: trainable parameters, adapter file size, held-out loss per source (train stage),
  GSM8K exact match on held-out problems (final number) and an MT-Bench-style score on a subset of
  MT-Bench questions from the local judge (evaluate stage), train time, seconds per optimizer step,
  peak memory, UORA re-initialisation events;
- baseline: the untouched base model through the evaluate stage; its held-out loss is the
  train stage's loss before the first step (every adapter starts at ΔW = 0).

    python benchmarks/compare_methods.py            # default settings: about 2 h on 2 CPU cores
    python benchmarks/compare_methods.py --quick    # smoke run: every method, 1 seed, few steps

A rerun resumes: finished runs are skipped and an interrupted one continues from its checkpoint
(the pipeline driver's manifests). Writes ``benchmarks/results/compare_methods[_quick].{csv,md,png}``
and ``compare_methods[_quick]_sweep.csv``; the default mode also rewrites README's results section.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: this checkout's pipeline, not an installed one
    sys.path.insert(0, str(REPO))

SETTINGS = REPO / "benchmarks" / "compare_methods.yaml"
RESULTS = REPO / "benchmarks" / "results"
README_START = "<!-- compare_methods:start -->"
README_END = "<!-- compare_methods:end -->"
EXPERIMENT = "uora-compare-methods"  # every cell logs to <work>/mlflow.db, where the results are read
BASELINE = "baseline"
SOURCES = {  # label -> (file under data_dir, answer rule)
    "roleplay": ("instruct/gpteacher_roleplay.json", "field"),
    "gsm8k": ("instruct/gsm8k_train_alpaca.json", "last_number"),
}
GREEDY = {c: 0.0 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                           "humanities", "gsm8k")}  # fmt: skip


class BenchmarkError(Exception):
    """Bad settings or a failed run: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_settings(path: Path, quick: bool) -> dict[str, Any]:
    """The benchmark YAML, with its ``quick`` section merged in for ``--quick``; checked here so a
    typo fails before two hours of training, not after."""
    import yaml

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise BenchmarkError(f"{path}: cannot read settings ({error})") from None
    quick_part = settings.pop("quick", {}) or {}
    if quick:
        settings = deep_merge(settings, quick_part)
    required = ("base_config", "data_dir", "data", "train", "eval", "seeds", "headline", "methods")
    for key in required:
        if key not in settings:
            raise BenchmarkError(f"{path}: '{key}' is missing")
    unknown = sorted(set(settings) - set(required) - {"goals", "sweep", "sweep_extend", "ablations"})
    if unknown:
        raise BenchmarkError(f"{path}: unknown setting(s) {unknown}")
    for name, method in settings["methods"].items():
        if not method.get("learning_rates"):
            raise BenchmarkError(f"{path}: methods.{name}.learning_rates must list at least one rate")
        if "method" not in method.get("adapter", {}):
            raise BenchmarkError(f"{path}: methods.{name}.adapter.method is missing")
    missing = [name for name in settings["headline"] if name not in settings["methods"]]
    if missing:
        raise BenchmarkError(f"{path}: headline: {missing} are not among methods")
    if not settings["seeds"]:
        raise BenchmarkError(f"{path}: seeds must list at least one seed")
    for method, variants in (settings.get("ablations") or {}).items():
        if method not in settings["methods"]:
            raise BenchmarkError(f"{path}: ablations: {method!r} is not among methods")
        for name, adapter in variants.items():
            if not isinstance(adapter, dict) or not str(name).replace("_", "").isalnum():
                raise BenchmarkError(f"{path}: ablations.{method}.{name}: expected a name (letters, "
                                     "digits, _) and a mapping of adapter settings")  # fmt: skip
    settings["ablations"] = settings.get("ablations") or {}
    settings.setdefault("sweep", True)
    settings.setdefault("sweep_extend", 0)
    settings.setdefault("goals", {})
    return settings


def data_dir(settings: dict[str, Any], override: str | None) -> Path:
    """Where the shared data lives: --data-dir, $UORA_SHARED_DATA, or the settings' data_dir."""
    chosen = override or os.environ.get("UORA_SHARED_DATA") or settings["data_dir"]
    path = Path(chosen)
    path = path if path.is_absolute() else (REPO / path).resolve()
    for rel, _ in SOURCES.values():
        if not (path / rel).is_file():
            raise BenchmarkError(f"data_dir: {path / rel} not found (set --data-dir or UORA_SHARED_DATA)")
    return path


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One pipeline run: a method at a learning rate and seed (or the untrained baseline)."""

    method: str
    learning_rate: float | None
    seed: int
    evaluate: bool
    eval_on_start: bool = False  # the loss before step 1 is the base model's: needed once per method
    variant: str = ""  # an ablation: the name of adapter settings that override the method's

    @property
    def name(self) -> str:
        if self.method == BASELINE:
            return BASELINE
        suffix = f"-{self.variant}" if self.variant else ""
        return f"{self.method}{suffix}-lr{self.learning_rate:g}-s{self.seed}"

    @property
    def stages(self) -> list[str]:
        if self.method == BASELINE:
            return ["prepare", "evaluate"]
        return ["prepare", "train", "evaluate"] if self.evaluate else ["prepare", "train"]


@dataclass
class Context:
    settings: dict[str, Any]
    data: Path
    work: Path
    model_override: str | None
    base: dict[str, Any] = field(default_factory=dict)


def pipeline_config(ctx: Context, cell: Cell) -> dict[str, Any]:
    """The run config of one cell: the base config with this benchmark's data, training, adapter
    and evaluation settings. Everything not named here comes from the base config."""
    from pipeline.config import apply_override
    from pipeline.schema import ADAPTERS

    s = ctx.settings
    config = copy.deepcopy(ctx.base)
    config["run"] = {"name": cell.name, "output_dir": str(ctx.work / "runs"), "seed": cell.seed}
    if ctx.model_override:
        config["model"] = {"name_or_path": ctx.model_override, "dtype": "float32"}
    sources = []
    for label, (rel, answer_from) in SOURCES.items():
        sources.append({"path": str(ctx.data / rel), "name": label, "samples": s["data"]["train_rows"][label],
                        "eval_samples": s["data"]["eval_rows"], "answer_from": answer_from})  # fmt: skip
    config["data"] = {"sources": sources, "seed": s["data"]["seed"], "max_length": s["data"]["max_length"],
                      "strict": False}  # fmt: skip
    if cell.method != BASELINE:
        adapter = copy.deepcopy(s["methods"][cell.method]["adapter"])
        if cell.variant:
            adapter = deep_merge(adapter, s["ablations"][cell.method][cell.variant])
        if "projection_prng_key" in getattr(ADAPTERS.get(adapter["method"]), "model_fields", {}):
            adapter.setdefault("projection_prng_key", cell.seed)  # a seed draws new projections too
        # The base config's adapter, switched to this method (keeping only what the methods share).
        apply_override(config, f"adapter.method={adapter['method']}")
        config["adapter"] = {**config["adapter"], **adapter}
        config["train"] = {**s["train"], "learning_rate": cell.learning_rate, "max_eval_samples": None,
                           "eval_on_start": cell.eval_on_start}  # fmt: skip
    e = s["eval"]
    config["eval"] = {
        "questions": str(ctx.data / "mt_bench" / "question.jsonl"),
        "reference_answers": str(ctx.data / "mt_bench" / "reference_answer_gpt-4.jsonl"),
        "question_ids": e["mt_bench_ids"],
        "heldout_questions": e["heldout_questions"],
        "heldout_sources": ["gsm8k"],
        "judge_verifiable": False,
        "max_new_tokens": e["max_new_tokens"],
        "batch_size": e["batch_size"],
        "temperatures": GREEDY,  # greedy everywhere: methods differ, not sampling luck
        "default_temperature": 0.0,
        "models": ["base"] if cell.method == BASELINE else ["tuned"],
        "judge": {"backend": "local", "local_scoring": "expected"},
    }
    config["promote"] = {"enabled": False}
    config["tracking"] = {"experiment": EXPERIMENT, "uri": store_uri(ctx)}
    return config


def write_config(ctx: Context, cell: Cell) -> Path:
    """The cell's config as YAML (kept next to its run), validated by the pipeline's own loader."""
    import yaml

    from pipeline.config import ConfigError, load_config

    path = ctx.work / "configs" / f"{cell.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(pipeline_config(ctx, cell), sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        raise BenchmarkError(f"{path}: {error.lines[0]}") from None
    return path


def is_done(config_path: Path, stages: list[str]) -> bool:
    """Every stage of the cell has an up-to-date output (the driver's own test for skipping)."""
    from pipeline.config import load_config
    from pipeline.driver import Pipeline

    pipeline = Pipeline(load_config(config_path))
    return all(pipeline.up_to_date(stage) for stage in stages)


def execute(ctx: Context, cell: Cell, log: Any) -> Path:
    """Run (or resume) one cell in a fresh process, so peak memory and time are its own."""
    config_path = write_config(ctx, cell)
    run_dir = ctx.work / "runs" / cell.name
    if is_done(config_path, cell.stages):
        log(f"  {cell.name}: done (skipped)")
        return run_dir
    log_path = ctx.work / "logs" / f"{cell.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pipeline", "run", str(config_path), "--only", ",".join(cell.stages)]
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with log_path.open("a", encoding="utf-8") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not is_done(config_path, cell.stages):
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise BenchmarkError(f"{cell.name}: pipeline exited {code}: {tail[0]} (log: {log_path})")
    log(f"  {cell.name}: {time.perf_counter() - started:.0f} s")
    return run_dir


# --------------------------------------------------------------------------------------------
# metrics of one run, from the cells' MLflow store
# --------------------------------------------------------------------------------------------
def store_uri(ctx: Context) -> str:
    return f"sqlite:///{ctx.work / 'mlflow.db'}"


def search_runs(ctx: Context, where: str) -> list[Any]:
    """Runs of the benchmark's experiment matching an MLflow filter, oldest first."""
    import mlflow

    mlflow.set_tracking_uri(store_uri(ctx))
    return mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=where,
                              order_by=["attributes.start_time ASC"], output_format="list")  # fmt: skip


def start_eval_seconds(ctx: Context, parents: list[Any]) -> float:
    """Seconds the trainer spent on the loss evaluation before step 1 (inside its train runtime,
    and done by only one cell per method): left out so train times compare. The last finished
    train run of the cell logged them at step 0 (``eval_<source>_runtime``)."""
    import mlflow

    trains = [run for parent in parents for run in search_runs(
        ctx, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.run_name = 'train' "
        "and attributes.status = 'FINISHED'")]  # fmt: skip
    if not trains:
        return 0.0
    train = max(trains, key=lambda run: run.info.start_time)
    client = mlflow.MlflowClient(store_uri(ctx))
    keys = [key for key in train.data.metrics if key.startswith("eval_") and key.endswith("_runtime")]
    return sum(point.value for key in keys for point in client.get_metric_history(train.info.run_id, key)
               if point.step == 0)  # fmt: skip


def cell_metrics(ctx: Context, cell: Cell) -> dict[str, Any]:
    """The numbers of one finished run: its pipeline run's metrics in MLflow (``train.*`` and
    ``evaluate.*`` on the parent run; a later parent run of the same cell, after a config edit,
    wins key by key), and the adapter's file size."""
    parents = search_runs(ctx, f"attributes.run_name = '{cell.name}'")
    metrics = {key: value for run in parents for key, value in run.data.metrics.items()}
    row: dict[str, Any] = {"method": cell.method, "learning_rate": cell.learning_rate, "seed": cell.seed}
    train = {key.removeprefix("train."): value for key, value in metrics.items() if key.startswith("train.")}
    if train:
        adapter = ctx.work / "runs" / cell.name / "train" / "adapter" / "adapter_model.safetensors"
        row.update(
            trainable_params=int(train["trainable_params"]),
            adapter_mb=adapter.stat().st_size / 2**20,
            loss_mean=train["eval_loss_after"],
            loss_before=train.get("eval_loss_before"),
            train_s=train["train_runtime_s"] - start_eval_seconds(ctx, parents),
            s_per_step=train.get("seconds_per_step_median"),
            peak_rss_mb=train["peak_rss_mb_rank0"],
            reinit_events=train.get("uora_reinit_events", 0.0 if "uora" in cell.method else None),
        )
        for label in SOURCES:
            row[f"loss_{label}"] = train.get(f"eval_loss_after.{label}")
            row[f"loss_before_{label}"] = train.get(f"eval_loss_before.{label}")
    model = "evaluate." + ("base" if cell.method == BASELINE else "tuned")
    if f"{model}.exact_match" in metrics or f"{model}.score_overall" in metrics:
        row["gsm8k_em"] = metrics.get(f"{model}.exact_match.gsm8k", metrics.get(f"{model}.exact_match"))
        row["mt_bench"] = metrics.get(f"{model}.score_overall")
    return row


# --------------------------------------------------------------------------------------------
# the whole comparison
# --------------------------------------------------------------------------------------------
def sweep_rates(settings: dict[str, Any], method: str) -> list[float]:
    rates = [float(r) for r in settings["methods"][method]["learning_rates"]]
    return rates if settings["sweep"] else [rates[len(rates) // 2]]


def extended_rate(scored: list[dict[str, Any]], factor: float = 3.0) -> float | None:
    """The next rate past the edge of the grid when the best rate sits on that edge, else None: a
    sweep whose optimum is its largest (smallest) rate has not found the optimum."""
    rates = sorted(row["learning_rate"] for row in scored)
    best = min(scored, key=lambda row: row["loss_mean"])["learning_rate"]
    if best == rates[-1]:
        return float(f"{best * factor:.3g}")
    if best == rates[0]:
        return float(f"{best / factor:.3g}")
    return None


def run_all(ctx: Context, methods: list[str], log: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sweep, pick, evaluate, repeat seeds; returns (rows of evaluated cells, sweep rows, each
    marked ``chosen`` or not)."""
    s = ctx.settings
    first_seed = s["seeds"][0]
    sweep: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    seen: dict[Cell, dict[str, Any]] = {}

    def measured(cell: Cell) -> dict[str, Any]:
        # A one-rate "sweep" cell is also that method's evaluated seed-0 cell: run and read it once.
        if cell not in seen:
            execute(ctx, cell, log)
            seen[cell] = cell_metrics(ctx, cell)
        return dict(seen[cell])

    for method in methods:
        rates = sweep_rates(s, method)
        log(f"{method}: learning rates {', '.join(f'{r:g}' for r in rates)}")
        for index, rate in enumerate(rates):
            cell = Cell(method, rate, first_seed, evaluate=len(rates) == 1, eval_on_start=index == 0)
            sweep.append(measured(cell))
        scored = [row for row in sweep if row["method"] == method]
        for _ in range(s["sweep_extend"] if len(rates) > 1 else 0):
            rate = extended_rate(scored)
            if rate is None:
                break
            log(f"{method}: the best rate is at the edge of the grid; trying {rate:g}")
            row = measured(Cell(method, rate, first_seed, evaluate=False))
            sweep.append({**row, "extended": True})
            scored.append(sweep[-1])
        best[method] = min(scored, key=lambda row: row["loss_mean"])["learning_rate"]
        for row in scored:
            row["chosen"] = row["learning_rate"] == best[method]
    rows: list[dict[str, Any]] = []
    baseline = Cell(BASELINE, None, first_seed, evaluate=True)
    log("baseline: the untrained model")
    rows.append(measured(baseline))
    for method in methods:
        seeds = s["seeds"] if method in s["headline"] else [first_seed]
        for seed in seeds:
            on_start = seed == first_seed and best[method] == sweep_rates(s, method)[0]
            cell = Cell(method, best[method], seed, evaluate=True, eval_on_start=on_start)
            rows.append(measured(cell))
    fill_baseline_loss(rows[0], list(seen.values()))
    return rows, sweep


def run_ablations(ctx: Context, methods: list[str], best: dict[str, float], log: Any) -> list[dict[str, Any]]:
    """Variants of a method's adapter settings (d_initial, init, re-init rule) at its chosen
    learning rate and first seed, trained and scored by held-out loss like the sweep; the plain
    method's row comes first, for comparison."""
    s = ctx.settings
    rows: list[dict[str, Any]] = []
    for method in methods:
        variants = s["ablations"].get(method) or {}
        if not variants:
            continue
        log(f"{method}: ablations {', '.join(variants)}")
        plain = Cell(method, best[method], s["seeds"][0], evaluate=True,
                     eval_on_start=best[method] == sweep_rates(s, method)[0])  # fmt: skip
        rows.append({**cell_metrics(ctx, plain), "variant": "as configured"})
        for variant in variants:
            cell = Cell(method, best[method], s["seeds"][0], evaluate=False, variant=variant)
            execute(ctx, cell, log)
            row = cell_metrics(ctx, cell)
            rows.append(
                {**row, "variant": variant, "settings": json.dumps(variants[variant], sort_keys=True)}
            )
    return rows


def fill_baseline_loss(baseline: dict[str, Any], measured: list[dict[str, Any]]) -> None:
    """The baseline's held-out loss: the loss before step 1 of the runs that evaluated it (one
    per method; ΔW = 0 at init for every method, so these agree up to float noise, and their
    spread is kept as a check)."""
    trained = [row for row in measured if row["method"] != BASELINE and row.get("loss_before") is not None]
    if not trained:
        return
    for key in ["loss_mean"] + [f"loss_{label}" for label in SOURCES]:
        before_key = "loss_before" if key == "loss_mean" else key.replace("loss_", "loss_before_")
        values = [row[before_key] for row in trained if row.get(before_key) is not None]
        if values:
            baseline[key] = statistics.fmean(values)
            baseline[f"{key}_init_spread"] = max(values) - min(values)
    baseline["trainable_params"] = 0


SUMMARY_FIELDS = ("trainable_params", "adapter_mb", "loss_roleplay", "loss_gsm8k", "loss_mean", "gsm8k_em",
                  "mt_bench", "train_s", "s_per_step", "peak_rss_mb", "reinit_events")  # fmt: skip


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean and (with several seeds) std of every number, in the order methods ran."""
    order: list[str] = []
    for row in rows:
        if row["method"] not in order:
            order.append(row["method"])
    summary = []
    for method in order:
        group = [row for row in rows if row["method"] == method]
        entry: dict[str, Any] = {
            "method": method,
            "learning_rate": group[0]["learning_rate"],
            "seeds": len(group),
        }
        for key in SUMMARY_FIELDS:
            values = [float(row[key]) for row in group if row.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)
    return summary


def check_goals(summary: list[dict[str, Any]], goals: dict[str, Any]) -> list[str]:
    """The issue's goals, each as one line: met or missed, and by how much."""
    by = {entry["method"]: entry for entry in summary}
    lines: list[str] = []
    uora, lora, vera = by.get("uora_r64"), by.get("lora_r8"), by.get("vera_r1024")
    if uora and vera and uora["loss_mean"] is not None and vera["loss_mean"] is not None:
        gap = uora["loss_mean"] - vera["loss_mean"]
        verdict = "met" if gap <= 0 else f"missed by {gap:.4f}"
        lines.append(
            f"UORA r=64 held-out loss {uora['loss_mean']:.4f} ≤ VeRA r=1024's "
            f"{vera['loss_mean']:.4f}: {verdict}"
        )
    if uora and lora and uora["loss_mean"] is not None and lora["loss_mean"] is not None:
        limit = goals.get("loss_within_lora", 0.02)
        rel = uora["loss_mean"] / lora["loss_mean"] - 1
        lines.append(f"UORA r=64 held-out loss within {limit:.0%} of LoRA r=8's ({lora['loss_mean']:.4f}): "
                     f"{rel:+.2%}: {'met' if rel <= limit else f'missed by {rel - limit:.2%}'}")  # fmt: skip
    if uora and lora and uora.get("trainable_params") and lora.get("trainable_params"):
        want = goals.get("fewer_params_than_lora", 10.0)
        ratio = lora["trainable_params"] / uora["trainable_params"]
        lines.append(f"trainable parameters, LoRA r=8 / UORA r=64: {ratio:.1f}x (goal ≥ {want:g}x): "
                     f"{'met' if ratio >= want else 'missed'}")  # fmt: skip
    if uora and vera and uora.get("s_per_step") and vera.get("s_per_step"):
        limit = goals.get("step_time_vs_vera", 0.7)
        ratio = uora["s_per_step"] / vera["s_per_step"]
        lines.append(f"step time, UORA r=64 / VeRA r=1024: {ratio:.2f} (goal ≤ {limit:g}): "
                     f"{'met' if ratio <= limit else f'missed by {ratio - limit:.2f}'}")  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------
# output: CSV, Markdown, plot, README
# --------------------------------------------------------------------------------------------
def to_csv(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for row in rows:
        keys.extend(key for key in row if key not in keys)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in keys})
    return buffer.getvalue()


def _cell(entry: dict[str, Any], key: str, fmt: str) -> str:
    value, std = entry.get(key), entry.get(f"{key}_std")
    if value is None:
        return "–"
    text = format(value, fmt)
    return f"{text} ± {format(std, fmt)}" if std is not None else text


def results_table(summary: list[dict[str, Any]]) -> str:
    columns = ["method", "LR", "seeds", "trainable params", "adapter file (MB)", "loss roleplay",
               "loss gsm8k", "loss mean", "GSM8K exact match", "MT-Bench (small judge)", "s/step", "train s",
               "peak RSS (MB)", "re-inits"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for e in summary:
        params = "0" if e["method"] == BASELINE else f"{e['trainable_params']:,.0f}"
        rate = "–" if e["learning_rate"] is None else f"{e['learning_rate']:g}"
        cells = [e["method"], rate, str(e["seeds"]), params] + [
            _cell(e, key, fmt)
            for key, fmt in (("adapter_mb", ".2f"), ("loss_roleplay", ".4f"), ("loss_gsm8k", ".4f"),
                             ("loss_mean", ".4f"), ("gsm8k_em", ".3f"), ("mt_bench", ".2f"),
                             ("s_per_step", ".2f"), ("train_s", ".0f"), ("peak_rss_mb", ".0f"),
                             ("reinit_events", ".0f"))
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_section(rows: list[dict[str, Any]]) -> str:
    """What else was tried for a method, at its chosen rate and first seed (held-out loss)."""
    if not rows:
        return ""
    lines = [
        "\n## Ablations (chosen learning rate, first seed)\n",
        "| method | variant | adapter settings | loss mean | loss roleplay | loss gsm8k | re-inits |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['variant']} | {row.get('settings', '–')} | {row['loss_mean']:.4f} | "
            f"{row['loss_roleplay']:.4f} | {row['loss_gsm8k']:.4f} | {_cell(row, 'reinit_events', '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    lines = [
        "| method | learning rate | loss mean | loss roleplay | loss gsm8k | chosen |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in sweep:
        lines.append(
            f"| {row['method']} | {row['learning_rate']:g} | {row['loss_mean']:.4f} | "
            f"{row.get('loss_roleplay') or float('nan'):.4f} | {row.get('loss_gsm8k') or float('nan'):.4f} | "
            f"{'✓' if row.get('chosen') else ''}{' (extended)' if row.get('extended') else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Quality against trainable parameters (log x): held-out loss and GSM8K exact match."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"lora": "s", "vera": "^", "uora": "o"}  # family by shape, rank by colour
    methods = [e for e in summary if e["method"] != BASELINE and e.get("trainable_params")]
    colours = {e["method"]: plt.get_cmap("tab10")(index) for index, e in enumerate(methods)}
    base = next((e for e in summary if e["method"] == BASELINE), None)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, label in ((axes[0], "loss_mean", "held-out loss (mean of sources; lower is better)"),
                             (axes[1], "gsm8k_em", "GSM8K exact match (held-out)")):  # fmt: skip
        for e in methods:
            if e.get(key) is None:
                continue
            seeds = f"{e['seeds']} seed{'s' * (e['seeds'] > 1)}"
            axis.errorbar(e["trainable_params"], e[key], yerr=e.get(f"{key}_std") or 0, capsize=4,
                          fmt=markers.get(e["method"].split("_")[0], "o"), markersize=7, alpha=0.85,
                          color=colours[e["method"]], label=f"{e['method']} ({seeds})")  # fmt: skip
        if base and base.get(key) is not None:
            axis.axhline(base[key], color="grey", linestyle="--", label="no training")
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(summary: list[dict[str, Any]], sweep: list[dict[str, Any]], goals: list[str], header: str,
             plot_name: str) -> str:  # fmt: skip
    return (
        f"# UORA vs LoRA vs VeRA on SmolLM2-135M-Instruct\n\n{header}\n\n{results_table(summary)}\n"
        "MT-Bench column: a small-judge score (SmolLM2-135M judging, probability-weighted rating), "
        "not comparable to GPT-4-judged MT-Bench numbers.\n\n"
        f"## Goals\n\n" + "\n".join(f"- {line}" for line in goals) + "\n\n"
        f"![quality vs trainable parameters]({plot_name})\n\n"
        f"## Learning-rate sweep (seed {sweep[0]['seed'] if sweep else '–'}, best held-out loss chosen)\n\n"
        f"{sweep_table(sweep)}"
    )


def update_readme(readme: Path, section: str) -> None:
    """Replace README's results section (between the markers) with ``section``."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise BenchmarkError(f"{readme}: markers {README_START} ... {README_END} not found")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{section}{README_END}{tail}", encoding="utf-8")


def stage_minutes(ctx: Context) -> float:
    """Minutes the cells' stages took (their finished MLflow stage runs): the benchmark's cost,
    however many invocations it took to finish (a resumed stage counts its last attempt)."""
    stages = [
        run for run in search_runs(ctx, "attributes.status = 'FINISHED'") if "pipeline.stage" in run.data.tags
    ]
    return sum(run.info.end_time - run.info.start_time for run in stages) / 60_000


def describe(ctx: Context, quick: bool) -> str:
    s = ctx.settings
    t, d = s["train"], s["data"]
    model = ctx.model_override or ctx.base["model"]["name_or_path"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python benchmarks/compare_methods.py" + (" --quick" if quick else "")
    rows = ", ".join(f"{k} {v} rows" for k, v in d["train_rows"].items())
    batch = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
    return (
        f"`{command}`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"1-min load average at the end {load:.1f}. Model {model}; data: {rows} to train on "
        f"(max {d['max_length']} tokens), {d['eval_rows']} held-out rows per source (data seed {d['seed']}); "
        f"{t['max_steps']} steps × batch {batch}, {t['lr_scheduler_type']} schedule; seeds {s['seeds']} for "
        f"{', '.join(s['headline'])}, seed {s['seeds'][0]} for the others. Mean ± std over seeds where there "
        "are several. s/step: median seconds per optimizer step (first logging interval excluded); train s: "
        "the trainer's runtime without the loss evaluation before step 1; peak RSS: the training process."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=Path, default=SETTINGS, help="benchmark YAML")
    parser.add_argument("--quick", action="store_true", help="smoke settings (the YAML's quick section)")
    parser.add_argument("--methods", help="comma-separated subset of the methods")
    parser.add_argument("--model", help="override the base config's model (a local HF folder)")
    parser.add_argument("--data-dir", help="the shared data folder (default: settings' data_dir)")
    parser.add_argument("--work", type=Path, help="run directories (default: runs/compare_methods[_quick])")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument(
        "--readme", type=Path, default=None, help="README to update (default mode: README.md)"
    )
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except BenchmarkError as error:
        print(f"compare_methods: {error}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    import yaml

    settings = load_settings(args.settings, args.quick)
    methods = list(settings["methods"])
    if args.methods:
        methods = [name.strip() for name in args.methods.split(",")]
        unknown = [name for name in methods if name not in settings["methods"]]
        if unknown:
            raise BenchmarkError(f"--methods: unknown {unknown} (known: {', '.join(settings['methods'])})")
    suffix = "_quick" if args.quick else ""
    work = (args.work or REPO / "runs" / f"compare_methods{suffix}").resolve()
    base_path = REPO / settings["base_config"]
    ctx = Context(settings, data_dir(settings, args.data_dir), work, args.model,
                  yaml.safe_load(base_path.read_text(encoding="utf-8")))  # fmt: skip
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    rows, sweep = run_all(ctx, methods, log)
    best = {row["method"]: row["learning_rate"] for row in sweep if row.get("chosen")}
    ablations = run_ablations(ctx, methods, best, log)
    summary = summarise(rows)
    goals = check_goals(summary, settings["goals"])
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"compare_methods{suffix}"
    (args.out / f"{name}.csv").write_text(to_csv(rows), encoding="utf-8")
    (args.out / f"{name}_summary.csv").write_text(to_csv(summary), encoding="utf-8")
    (args.out / f"{name}_sweep.csv").write_text(to_csv(sweep), encoding="utf-8")
    if ablations:
        (args.out / f"{name}_ablations.csv").write_text(to_csv(ablations), encoding="utf-8")
    plot(summary, args.out / f"{name}.png")
    header = (
        describe(ctx, args.quick)
        + f" Stage time of all cells: {stage_minutes(ctx):.0f} min (resumed runs included)."
    )
    report = markdown(summary, sweep, goals, header, f"{name}.png") + ablation_section(ablations)
    (args.out / f"{name}.md").write_text(report, encoding="utf-8")
    print(results_table(summary))
    for line in goals:
        print(f"- {line}")
    readme = args.readme or (None if args.quick else REPO / "README.md")
    if readme is not None:
        plot_link = os.path.relpath(args.out / f"{name}.png", readme.parent)
        section = (f"{header}\n\n{results_table(summary)}\n" + "\n".join(f"- {line}" for line in goals)
                   + f"\n\n![quality vs trainable parameters]({plot_link})\n")  # fmt: skip
        update_readme(readme, section)
    if any(math.isnan(row.get("loss_mean", 0.0) or 0.0) for row in rows):
        raise BenchmarkError("a run produced a NaN held-out loss (see the CSV)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
