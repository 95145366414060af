"""The GPU kit's driver (``benchmarks/gpu/run.sh`` calls it): environment, then three parts, then
one markdown report, all inside a global deadline.

- (a) ``pytest -m gpu tests/gpu``: bf16 numerics, bitsandbytes int8, DeepSpeed ZeRO-2, SDPA;
- (b) ``pipeline_part.py``: prepare -> train -> export on SmolLM2-135M's shape (random weights);
- (c) ``throughput.py``: Llama-2-7B shape, UORA/VeRA/LoRA on a bf16 and an int8 base.

Each part runs in its own process group with its own time limit (what is left, less what later
parts are guaranteed); a failing or timed-out part is recorded and the next one still runs, and
the report is rewritten after every part, so a kill leaves what was done. The report goes to
``$OUT`` (when set) and, on a GPU, to ``benchmarks/results/gpu_<device>.md``.

``--rehearse`` runs the same on the CPU with tiny shapes (the GPU tests with
``UORA_GPU_TESTS_ON_CPU=1``), writing only to ``$OUT`` or the work folder: CI runs it, so the one
GPU call is never spent on a typo. Environment: ``KIT_T0`` (epoch seconds the run began; run.sh
sets it before installing the wheels), ``KIT_DEADLINE_S`` (default 450), ``KIT_WORK``
(scratch, default /tmp/uora-gpu-kit).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = REPO / "benchmarks" / "results"
HEADER = "| method | r | base | seq len | batch | tokens/s | MFU % | peak GPU GiB |"
# Seconds: at most per part, and at least what each later part keeps of the deadline.
CAP = {"tests": 170, "pipeline": 150}
KEEP = {"pipeline": 80, "throughput": 150, "report": 10}
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "deepspeed",
    "bitsandbytes",
    "pydantic",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "numpy",
    "pandas",
    "pyarrow",
    "fsspec",
    "typing_extensions",
    "mlflow",
)
ENV_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
info = {"python": sys.version.split()[0], "packages": {}, "import_errors": {}}
for name in sys.argv[1].split(","):
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        info["packages"][name] = None
        continue
    try:  # mlflow only by version: the kit runs without it, and its import takes seconds
        module = importlib.import_module(name) if name != "mlflow" else None
        info["packages"][name] = [version, getattr(module, "__file__", "") or ""]
    except Exception as error:
        info["packages"][name] = [version, ""]
        info["import_errors"][name] = f"{type(error).__name__}: {error}"[:300]
import torch
info["cuda"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if info["cuda"]:
    props = torch.cuda.get_device_properties(0)
    info["device"] = torch.cuda.get_device_name(0)
    info["memory_gib"] = round(props.total_memory / 2**30, 1)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    info["bf16"] = torch.cuda.is_bf16_supported()
print(json.dumps(info))
"""


class Kit:
    def __init__(self, rehearse: bool):
        self.rehearse = rehearse
        self.t0 = float(os.environ.get("KIT_T0") or time.time())
        self.deadline = self.t0 + float(os.environ.get("KIT_DEADLINE_S") or 450)
        self.work = Path(os.environ.get("KIT_WORK") or "/tmp/uora-gpu-kit")
        self.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else self.work / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.scratch = self.work / "parts"
        subprocess.run(["rm", "-rf", str(self.scratch)], check=False)
        self.scratch.mkdir(parents=True)
        self.results: dict[str, Any] = {
            "mode": "rehearsal (CPU, tiny shapes)" if rehearse else "GPU",
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git_commit(),
            "parts": {},
            "throughput": [],
        }

    # -- helpers ------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def run(
        self, name: str, command: list[str], log: str, timeout: float, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """One part's process, its output in ``$OUT/<log>``; killed (its whole group) at ``timeout``."""
        timeout = max(1.0, timeout)
        shown = " ".join(arg if len(arg) < 200 else "<script>" for arg in command)
        print(f"== {name}: {shown}  (limit {timeout:.0f}s)", flush=True)
        began = time.time()
        with (self.out / log).open("a", encoding="utf-8") as handle:
            handle.write(f"$ {shown}\n")
            handle.flush()
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
            try:
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
                for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=grace)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
            with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers in its group go too
                os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.time() - began
        status = "timed out" if code is None else "ok" if code == 0 else f"exit {code}"
        print(f"== {name}: {status} after {seconds:.0f}s", flush=True)
        return {"exit": code, "seconds": round(seconds, 1), "timed_out": code is None, "log": log}

    def tail(self, log: str, lines: int = 12) -> list[str]:
        text = (self.out / log).read_text(encoding="utf-8", errors="replace").splitlines()
        keep = [
            line for line in text if line.strip() and "Warning" not in line and "warnings.warn" not in line
        ]
        return [line[:300] for line in keep[-lines:]]

    # -- the parts ----------------------------------------------------------------------------
    def environment(self) -> None:
        """Versions (and where each package came from), the device, nvidia-smi."""
        probe = self.run(
            "environment",
            [sys.executable, "-c", ENV_PROBE, ",".join(PACKAGES)],
            "env.log",
            min(90, self.left()),
        )
        lines = (self.out / "env.log").read_text(encoding="utf-8", errors="replace").splitlines()
        info = next((json.loads(line) for line in reversed(lines) if line.startswith("{")), None)
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            smi = None
        with (self.out / "env.log").open("a", encoding="utf-8") as handle:
            handle.write(smi.stdout if smi else "nvidia-smi: not found\n")
        site = os.environ.get("KIT_SITE", "")
        env = {
            "probe": probe,
            "info": info,
            "carried_from": site,
            "nvidia_smi": _smi_summary(smi.stdout) if smi and smi.returncode == 0 else None,
        }
        if info is None:
            env["key_lines"] = self.tail("env.log")
        self.results["environment"] = env
        device = (info or {}).get("device") if not self.rehearse else None
        self.results["device"] = device or ("cpu (rehearsal)" if self.rehearse else "unknown (no CUDA)")
        self.slug = "cpu_rehearsal" if self.rehearse else _slug(device or "no_cuda")

    def tests(self) -> None:
        xml = self.scratch / "pytest.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/gpu",
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            "-o",
            "junit_family=xunit1",
            f"--timeout={300 if self.rehearse else 120}",  # per test: a hang costs one test, not the rest
        ]
        env = {"UORA_GPU_TESTS_ON_CPU": "1"} if self.rehearse else {}
        timeout = min(CAP["tests"], self.left() - KEEP["pipeline"] - KEEP["throughput"] - KEEP["report"])
        part = self.run("(a) pytest -m gpu", command, "pytest.log", timeout, env)
        cases = _junit_cases(xml)
        counts = {
            k: sum(1 for c in cases if c["outcome"] == k) for k in ("passed", "failed", "error", "skipped")
        }
        part.update(cases=cases, counts=counts)
        ok = part["exit"] == 0 and counts["passed"] > 0 and not counts["failed"] and not counts["error"]
        part["status"] = "passed" if ok else "timed out" if part["timed_out"] else "failed"
        if not cases:
            part["key_lines"] = self.tail("pytest.log")
        self.results["parts"]["tests"] = part

    def pipeline(self) -> None:
        summary = self.scratch / "pipeline.json"
        command = [
            sys.executable,
            str(HERE / "pipeline_part.py"),
            "--work",
            str(self.scratch / "pipeline"),
            "--summary",
            str(summary),
        ] + (["--tiny"] if self.rehearse else [])
        timeout = min(CAP["pipeline"], self.left() - KEEP["throughput"] - KEEP["report"])
        part = self.run("(b) pipeline prepare -> train -> export", command, "pipeline.log", timeout)
        part["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
        part["status"] = "passed" if part["exit"] == 0 else "timed out" if part["timed_out"] else "failed"
        if part["status"] != "passed":
            part["key_lines"] = self.tail("pipeline.log")
        self.results["parts"]["pipeline"] = part

    def throughput(self) -> None:
        rows_file = self.scratch / "throughput.jsonl"
        runs = {}
        for base, share in (("bf16", 0.55), ("int8", 1.0)):
            span = (self.left() - KEEP["report"] - 30) * share  # 30 s: a configuration running over
            command = [
                sys.executable,
                str(HERE / "throughput.py"),
                "--base",
                base,
                "--deadline",
                str(time.time() + span),
                "--out",
                str(rows_file),
            ] + (["--tiny"] if self.rehearse else [])
            runs[base] = self.run(
                f"(c) throughput, {base} base",
                command,
                "throughput.log",
                min(span + 30, self.left() - KEEP["report"]),
            )
        rows = (
            [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
        )
        from throughput import METHODS, TINY_METHODS

        seq_len = 64 if self.rehearse else 1024
        done = {(r["method"], r["r"], r["base"]) for r in rows}
        for base in ("bf16", "int8"):
            for method, r in TINY_METHODS if self.rehearse else METHODS:
                if (method, r, base) not in done:
                    why = "timed out" if runs[base]["timed_out"] else f"exit {runs[base]['exit']}"
                    rows.append(
                        {
                            "method": method,
                            "r": r,
                            "base": base,
                            "seq_len": seq_len,
                            "status": f"not run: {why}",
                        }
                    )
        self.results["throughput"] = rows
        measured = sum(1 for r in rows if r.get("status") == "ok")
        ok = measured == len(rows) and all(run["exit"] == 0 for run in runs.values())
        part = {
            "log": "throughput.log",
            "runs": runs,
            "measured": measured,
            "configs": len(rows),
            "seconds": round(sum(run["seconds"] for run in runs.values()), 1),
            "status": "passed" if ok else "partial" if measured else "failed",
        }
        if not ok:
            part["key_lines"] = self.tail("throughput.log", 8)
        self.results["parts"]["throughput"] = part

    # -- the report ---------------------------------------------------------------------------
    def write(self) -> Path:
        self.results["seconds"] = round(time.time() - self.t0, 1)
        text = report(self.results)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        name = f"gpu_{getattr(self, 'slug', 'unknown')}.md"
        (self.out / name).write_text(text, encoding="utf-8")
        if not self.rehearse and (self.results.get("environment", {}).get("info") or {}).get("cuda"):
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / name).write_text(text, encoding="utf-8")
        return self.out / name


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _git_commit() -> str | None:
    """HEAD, marked when the tree differs from it (a device tool may copy a tree onto an older .git)."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
        return run.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None  # the GPU host gets the tree without .git
    return f"{head}, with uncommitted changes" if dirty else head


def _smi_summary(text: str) -> str | None:
    """The driver/CUDA line of nvidia-smi's banner."""
    return next(
        (" ".join(line.strip("| ").split()) for line in text.splitlines() if "Driver Version" in line), None
    )


def _junit_cases(xml: Path) -> list[dict[str, Any]]:
    """Each test's outcome and, for failures, the assertion's ``E`` lines (or the message)."""
    if not xml.is_file():
        return []
    cases = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
        outcome, lines = "passed", []
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                body = (found.text or "").splitlines()
                lines = [ln[1:].strip() for ln in body if ln.startswith("E ")][:4] or [
                    found.get("message", "")[:300]
                ]
                break
        cases.append(
            {"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0), "lines": lines}
        )
    return cases


def _number(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}".replace(",", "")


def throughput_table(rows: list[dict[str, Any]]) -> list[str]:
    """The table another tool parses: the header is fixed (HEADER)."""
    lines = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        key = f"| {row['method']} | {row['r']} | {row['base']} | {row['seq_len']} |"
        if row.get("status") != "ok":
            lines.append(f"{key} - | {row.get('status', 'not run')} | - | - |")
            continue
        lines.append(
            f"{key} {row['batch']} | {_number(row['tokens_per_s'])} | {_number(row['mfu_pct'], 1)} | "
            f"{_number(row['peak_gib'], 1)} |"
        )
    return lines


def report(results: dict[str, Any]) -> str:
    """The markdown report: environment, each part's outcome (failures' key lines), throughput."""
    parts = results["parts"]
    rehearse = results["mode"] != "GPU"
    title = (
        "GPU kit rehearsal on the CPU (tiny shapes: no number here is a GPU measurement)"
        if rehearse
        else f"GPU kit: {results.get('device')}"
    )
    out = [
        f"# {title}",
        "",
        f"Run {results['started']} (commit {results.get('commit') or 'unknown: no .git on the host'}), "
        f"{results.get('seconds', 0):.0f} s in all, by `bash benchmarks/gpu/run.sh"
        f'{" --rehearse" if rehearse else ""}` (README, "GPU hosts").',
        "",
        "## Environment",
        "",
        *_environment(results.get("environment") or {}),
        "",
        "## Parts",
        "",
        "| part | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    tests, pipe = parts.get("tests"), parts.get("pipeline")
    labels = {
        "tests": "(a) `pytest -m gpu tests/gpu`",
        "pipeline": "(b) pipeline prepare → train → export, SmolLM2-135M shape, RANDOM weights",
        "throughput": "(c) throughput, Llama-2-7B shape, random weights",
    }
    summaries = {
        "tests": lambda p: ", ".join(f"{v} {k}" for k, v in p.get("counts", {}).items() if v) or "-",
        "pipeline": lambda p: _pipeline_line(p.get("summary")),
        "throughput": lambda p: f"{p.get('measured', 0)} of {p.get('configs', 0)} configurations measured",
    }
    for name, label in labels.items():
        part = parts.get(name)
        if part is None:
            out.append(f"| {label} | not run: deadline | | |")
        else:
            out.append(
                f"| {label} | {part['status']} | {part.get('seconds', 0):.0f} | {summaries[name](part)} |"
            )
    if tests and tests.get("cases"):
        out += [
            "",
            "Tests: " + ", ".join(f"`{c['name'].split('::')[-1]}` {c['outcome']}" for c in tests["cases"]),
        ]
    failures = [
        f"- (a) `{c['name']}` {c['outcome']}: " + " / ".join(c["lines"])
        for c in (tests or {}).get("cases", [])
        if c["outcome"] in ("failed", "error")
    ]
    for name, part in parts.items():
        if part.get("key_lines"):
            failures += [
                f"- {labels.get(name, name)[:3]} last lines of {part.get('log', name)}:",
                *[f"      {line}" for line in part["key_lines"]],
            ]
    if failures:
        out += ["", "### Failures", "", *failures]
    if pipe and pipe.get("summary"):
        out += ["", "### (b) in detail", "", *_pipeline_detail(pipe["summary"])]
    out += [
        "",
        "## Throughput",
        "",
        *throughput_table(results.get("throughput", [])),
        "",
        *_throughput_notes(results),
    ]
    return "\n".join(out) + "\n"


def _environment(env: dict[str, Any]) -> list[str]:
    info = env.get("info")
    if not info:
        return [
            "The environment probe failed; its last lines (env.log):",
            "",
            *[f"    {line}" for line in env.get("key_lines", [])],
        ]
    device = (
        (
            f"{info.get('device')}, {info.get('memory_gib')} GiB, "
            f"compute capability {info.get('capability')}, bf16 {info.get('bf16')}"
        )
        if info.get("cuda")
        else "no CUDA device visible"
    )
    lines = [
        f"- device: {device}",
        f"- driver: {env.get('nvidia_smi') or 'nvidia-smi: n/a'}",
        f"- Python {info.get('python')}, torch built for CUDA {info.get('torch_cuda')}",
        "",
        "| package | version | from |",
        "|---|---|---|",
    ]
    site = env.get("carried_from") or "\0"
    for name, value in info.get("packages", {}).items():
        if value is None:
            lines.append(f"| {name} | not installed | |")
            continue
        origin = (
            "carried wheel"
            if value[1].startswith(site)
            else "installed here"
            if site == "\0"
            else "host image"
        )
        error = info.get("import_errors", {}).get(name)
        lines.append(f"| {name} | {value[0]} | {origin}{'; IMPORT FAILED: ' + error if error else ''} |")
    return lines


def _pipeline_line(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "no summary (see pipeline.log)"
    train = (summary["stages"].get("train") or {}).get("metrics") or {}
    verify = summary.get("export_verification") or {}
    bits = [f"{name} {stage['status']}" for name, stage in summary["stages"].items()]
    if train:
        bits.append(
            f"eval loss {train.get('eval_loss_before', float('nan')):.3f} → "
            f"{train.get('eval_loss_after', float('nan')):.3f}"
        )
    if verify:
        bits.append(
            f"export check {'passed' if verify.get('passed') else 'FAILED'} "
            f"(rel. error {verify.get('rel_error', float('nan')):.2g})"
        )
    return "; ".join(bits)


def _pipeline_detail(summary: dict[str, Any]) -> list[str]:
    keys = (
        "eval_loss_before",
        "eval_loss_after",
        "train_loss_mean",
        "tokens_per_second_mean",
        "seconds_per_step_median",
        "peak_cuda_memory_mb_rank0",
        "peak_rss_mb_rank0",
        "trainable_params",
        "global_step",
        "uora_reinit_events",
    )
    lines = ["| stage | status | seconds | metrics |", "|---|---|---|---|"]
    for name, stage in summary["stages"].items():
        metrics = stage.get("metrics") or {}
        shown = (
            {k: metrics[k] for k in keys if k in metrics}
            if name == "train"
            else dict(list(metrics.items())[:4])
        )
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds') or ''} | {text} |")
    verify = summary.get("export_verification")
    if verify:
        lines += [
            "",
            "Export verification (merged vs. base + adapter, float32 logits): "
            + ", ".join(
                f"{k} {verify[k]:.3g}" if isinstance(verify[k], float) else f"{k} {verify[k]}"
                for k in (
                    "dtype",
                    "max_abs_error",
                    "rel_error",
                    "top1_agreement",
                    "tolerance",
                    "passed",
                    "adapter_effect_rel",
                )
                if k in verify
            ),
        ]
    return lines


def _throughput_notes(results: dict[str, Any]) -> list[str]:
    rows = [r for r in results.get("throughput", []) if r.get("status") == "ok"]
    rehearse = results["mode"] != "GPU"
    shape = (
        "a tiny Llama (2 layers, hidden 64) on the CPU"
        if rehearse
        else ("Llama-2-7B's shape (32 layers, hidden 4096, MLP 11008, vocab 32000)")
    )
    notes = [
        f"Model: {shape}, RANDOM weights built on the device in bf16; the int8 base quantised layer "
        "by layer as transformers does when loading in 8 bits (bitsandbytes `Linear8bitLt`, threshold "
        "6.0), then `prepare_model_for_kbit_training` as the train stage does. Adapters: the adapter "
        "section of `configs/llama2_7b.yaml` (dropout 0.05) with method/r replaced, on every linear "
        "layer but lm_head. Training: gradient checkpointing (non-reentrant), bf16 autocast, torch "
        "AdamW (fused on CUDA), random token ids, UORA's re-init check after every step. tokens/s = "
        "batch × seq len / mean step time of 2 timed steps after a warm-up step at the same batch.",
        "",
        "Batch: steps at batch 1 and 2 measure the peak memory per sequence; the largest batch "
        "predicted to fit in 92% of the card's memory is tried (−20% per OOM), capped so that the "
        "configuration fits its share of the deadline (the 'chosen by' column). Peak GPU GiB: "
        "`torch.cuda.max_memory_allocated` during the last timed step (optimizer state included).",
        "",
        "MFU = tokens/s × model FLOPs per token / peak. Model FLOPs per token for a frozen base: "
        "forward 2N + input-gradient backward 2N (no weight gradients), N = the decoder's linear "
        "weights plus lm_head, plus attention 12·L·s·d (score and value products, forward and "
        "backward, over the full s×s square); the adapters' own FLOPs are not counted (overhead: MFU "
        "is proportional to tokens/s across methods). HFU adds gradient checkpointing's recomputed "
        "forward (2·N_layers + 4·L·s·d).",
    ]
    if rows:
        flops = rows[0]["flops_per_token"]
        peak = rows[0].get("peak_tflops")
        notes[-1] += (
            f" Here: {flops['model'] / 1e9:.2f} GFLOP/token (model), {flops['hardware'] / 1e9:.2f} "
            f"(hardware), N = {flops['params_linear'] / 1e9:.3f} B; peak = "
            + (
                f"{peak} TFLOP/s, the card's dense bf16 spec (H100/H200 SXM: 989.4)."
                if peak
                else "unknown for this device (MFU not computed)."
            )
        )
        notes += [
            "",
            "| method | r | base | batch chosen by | predicted fit | OOMs | s/step | HFU % | trainable |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            capped = r["batch"] >= r["time_cap"] and (r["predicted_fit"] or 10**9) > r["time_cap"]
            chosen = "time cap" if capped else "memory" + (" (after OOM)" if r.get("ooms") else "")
            notes.append(
                f"| {r['method']} | {r['r']} | {r['base']} | {chosen} | {r.get('predicted_fit') or '-'} | "
                f"{len(r.get('ooms', []))} | {r['seconds_per_step']:.3g} | {_number(r.get('hfu_pct'), 1)} | "
                f"{r['trainable_params']:,} |"
            )
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true", help="CPU, tiny shapes (what CI runs)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    kit = Kit(args.rehearse)
    kit.environment()
    kit.write()
    for part in (kit.tests, kit.pipeline, kit.throughput):
        if kit.left() < KEEP["report"] + 5:
            print(f"== {part.__name__}: not run (deadline)", flush=True)
            continue
        try:
            part()
        except Exception as error:  # the kit's own bug must not cost the other parts or the report
            import traceback

            traceback.print_exc()
            kit.results["parts"][part.__name__] = {
                "status": f"kit error: {type(error).__name__}: {error}",
                "seconds": 0,
                "key_lines": [],
            }
        path = kit.write()
    print(f"\n== report: {path}\n", flush=True)
    print(path.read_text(encoding="utf-8"), flush=True)
    failed = [name for name, part in kit.results["parts"].items() if part.get("status") != "passed"]
    return 1 if failed or len(kit.results["parts"]) < 3 else 0


if __name__ == "__main__":
    sys.exit(main())
