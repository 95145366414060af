"""The training recipe, top to bottom: one process of an SFT run (``python -m ... SPEC_JSON``).

The train stage runs this in-process for a single CPU/GPU process, or launches it under torchrun
for several processes and/or DeepSpeed; a Slurm job can launch it the same way. Every input comes
from the spec JSON the stage writes into its work folder (the exact config, the dataset path, the
MLflow run), so a requeued job needs nothing but that file.

Order of events: preemption handlers → device/distributed setup → tokenizer + training chat
template → data → base model (8-bit optional) → adapter → SFTTrainer → resume from the last
complete checkpoint, if any → train → (preempted: checkpoint saved, exit 0, no DONE) → final eval
→ adapter + tokenizer saved, verified complete → metrics, loss curve → ``DONE`` last.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from pipeline import quiet

quiet.install()  # first in a worker process: the imports below load transformers and bitsandbytes

from pipeline.stages.train_dist import (  # noqa: E402
    PreemptionCallback,
    PreemptionFlag,
    all_gather,
    barrier,
    last_complete_checkpoint,
    rank,
    remove_incomplete_checkpoints,
    training_args_for_device,
)
from pipeline.tracking import metric_name  # noqa: E402

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
DONE = "DONE"
PREEMPTED = "PREEMPTED"
METRICS = "metrics.json"
LOSS_PNG = "loss_curve.png"


class TrainingFailed(RuntimeError):
    """A user-facing failure inside the worker: printed as one line, non-zero exit."""


def projection_digest(model: Any) -> str | None:
    """sha256 over the UORA/VeRA shared projection buffers (None for LoRA). Every rank must hold
    identical projections (re-initialisation writes them on all ranks); rank 0 compares digests.
    Hashed as raw bytes: numpy has no bfloat16."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    found = False
    for name, buffer in sorted(model.named_buffers(), key=lambda item: item[0]):
        if any(tag in name for tag in ("uora_A", "uora_B", "vera_A", "vera_B")):
            digest.update(name.encode())
            digest.update(buffer.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            found = True
    return digest.hexdigest() if found else None


def _prepare_datasets(dataset_dir: Path, tcfg: Any, completion_only: bool) -> tuple[Any, Any]:
    """The train split and the eval split; the eval split is a ``{source: rows}`` dict when it holds
    several sources, so the trainer reports a held-out loss per source (``eval_<source>_loss``)."""
    import datasets

    # Mapping a dataset loaded from disk would write cache files into the prepare stage's output.
    datasets.disable_caching()
    if not (dataset_dir / "dataset_dict.json").is_file():
        raise TrainingFailed(f"prepared dataset not found: {dataset_dir} (run the 'prepare' stage first)")
    data = datasets.load_from_disk(str(dataset_dir))
    for split in ("train", "eval"):
        if split not in data:
            raise TrainingFailed(f"{dataset_dir}: split '{split}' missing (have: {sorted(data)})")
        if "messages" not in data[split].column_names:
            raise TrainingFailed(f"{dataset_dir}: split '{split}' has no 'messages' column")
    train = data["train"].select_columns(["messages"])
    evals = eval_sets(data["eval"])

    def shaped(rows: Any, cap: int | None) -> Any:
        if cap is not None and len(rows) > cap:
            rows = rows.select(range(cap))
        if completion_only:
            from pipeline.stages.train_templates import to_prompt_completion

            rows = rows.map(to_prompt_completion, remove_columns=["messages"])
        return rows

    train = shaped(train, None)
    if isinstance(evals, dict):
        return train, {name: shaped(rows, tcfg.max_eval_samples) for name, rows in evals.items()}
    return train, shaped(evals, tcfg.max_eval_samples)


def eval_sets(evals: Any) -> Any:
    """The eval split as one dataset, or as ``{metric_name(source): rows}`` for several sources."""
    sources = sorted(set(evals["source"])) if "source" in evals.column_names else []
    if len(sources) < 2:
        return evals.select_columns(["messages"])
    by_name = {}
    for source in sources:
        name = metric_name(source)
        if name in by_name:
            raise TrainingFailed(f"eval sources {source!r} and another map to the same metric name {name!r}")
        rows = evals.select([i for i, label in enumerate(evals["source"]) if label == source])
        by_name[name] = rows.select_columns(["messages"])
    return by_name


def eval_losses(metrics: dict[str, Any], names: list[str] | None) -> dict[str, float]:
    """``{"": overall, name: per-source...}`` from trainer eval metrics (one set or per source).

    With several sources the overall loss is their unweighted mean, so each source counts the
    same however many rows it holds.
    """
    if not names:
        return {"": float(metrics["eval_loss"])} if "eval_loss" in metrics else {}
    found = {name: float(metrics[f"eval_{name}_loss"]) for name in names if f"eval_{name}_loss" in metrics}
    if len(found) != len(names):
        return {}
    return {"": sum(found.values()) / len(found), **found}


def _load_model(cfg: Any) -> Any:
    from pipeline.models import load_model

    model = load_model(cfg.model)
    model.config.use_cache = False  # the KV cache is useless in training and fights checkpointing
    if cfg.model.load_in_8bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


def verify_adapter(adapter_dir: Path, model: Any) -> int:
    """Check the saved adapter is complete: every trainable tensor present, non-empty, and with
    its full (un-partitioned) shape. ZeRO-3 can silently save empty adapters (trl#4416,
    peft#2892); we verify instead of assuming. Returns the number of tensors checked."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainingFailed(f"adapter not saved: {path} missing")
    with safe_open(str(path), framework="pt") as handle:
        saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    empty = [k for k, shape in saved.items() if 0 in shape]
    if not saved or empty:
        raise TrainingFailed(f"saved adapter {path} is empty or has empty tensors: {empty[:3]}")
    adapter_name = getattr(model, "active_adapter", "default")
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = name.replace(f".{adapter_name}.", ".").replace(f".{adapter_name}", "")
        want = tuple(getattr(param, "ds_shape", param.shape))
        if saved.get(key) != want:
            raise TrainingFailed(f"saved adapter {path}: tensor {key} is {saved.get(key)}, expected {want}")
    return len(saved)


def _count_int8_layers(model: Any) -> int:
    """Linear layers whose base weight is bitsandbytes int8 (proves an 8-bit base is 8-bit)."""
    import bitsandbytes as bnb

    return sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))


def train(spec: dict[str, Any]) -> int:
    """Run (or resume) one training process; returns the process exit code."""
    import datasets
    import torch

    caching, threads = datasets.is_caching_enabled(), torch.get_num_threads()
    flag = PreemptionFlag().install()
    try:
        return _train(spec, flag)
    finally:  # leave an in-process caller (the driver) as we found it
        flag.uninstall()
        torch.set_num_threads(threads)
        if caching:
            datasets.enable_caching()


def _train(spec: dict[str, Any], flag: PreemptionFlag) -> int:
    work_dir = Path(spec["work_dir"])
    is_rank0 = rank() == 0
    pids = work_dir / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{rank()}.pid").write_text(str(os.getpid()))

    import torch
    import transformers
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    import uora  # registers UORA with PEFT
    from pipeline.adapters import build_peft_config
    from pipeline.config import PipelineConfig
    from pipeline.models import load_tokenizer
    from pipeline.stages.train_metrics import MetricsCallback, plot_loss_curve
    from pipeline.stages.train_templates import choose_training_template

    cfg = PipelineConfig.model_validate(spec["config"])
    tcfg = cfg.train
    use_cpu = tcfg.use_cpu if tcfg.use_cpu is not None else not torch.cuda.is_available()
    device_kwargs = training_args_for_device(use_cpu, bool(tcfg.deepspeed))
    if use_cpu and tcfg.omp_num_threads:  # torchrun workers get it as OMP_NUM_THREADS; in-process too
        torch.set_num_threads(tcfg.omp_num_threads)
    transformers.set_seed(cfg.run.seed)

    # --- tokenizer and the chat template the loss mask comes from ---------------------------
    tokenizer = load_tokenizer(cfg.model)
    completion_only = False
    if tcfg.assistant_only_loss:
        choice = choose_training_template(tokenizer)
        if choice.template is not None:
            tokenizer.chat_template = choice.template
            _log(is_rank0, f"assistant-only loss; chat template: {choice.reason}")
        elif tcfg.template_fallback == "error":
            raise TrainingFailed(
                f"model.chat_template: {choice.reason}; provide a template with {{% generation %}} markers "
                "or set train.template_fallback: completion_only"
            )
        else:
            completion_only = True
            _log(
                is_rank0, f"{choice.reason}: falling back to completion-only loss on the last assistant turn"
            )

    train_ds, eval_ds = _prepare_datasets(Path(spec["dataset_dir"]), tcfg, completion_only)

    # --- trainer arguments -------------------------------------------------------------------
    ckpt_dir = work_dir / CHECKPOINTS
    if is_rank0:
        remove_incomplete_checkpoints(ckpt_dir)
    resume = last_complete_checkpoint(ckpt_dir)
    # The train section's SFTConfig fields go in as they are; the rest is the stage's own wiring.
    args = SFTConfig(**{
        **tcfg.sft_kwargs(),
        "activation_checkpointing": tcfg.activation_checkpointing and not cfg.model.load_in_8bit,
        "assistant_only_loss": tcfg.assistant_only_loss and not completion_only,
        "eval_on_start": tcfg.eval_on_start and resume is None,
        "output_dir": str(ckpt_dir),
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "completion_only_loss": True if completion_only else None,
        "logging_first_step": True,
        "eval_strategy": "steps" if tcfg.eval_steps else "no",
        "save_strategy": "steps",
        "include_num_input_tokens_seen": "non_padding",
        "report_to": "none",
        "disable_tqdm": not is_rank0,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
        **device_kwargs,
    })  # fmt: skip

    # --- model and adapter --------------------------------------------------------------------
    model = _load_model(cfg)
    model = get_peft_model(model, build_peft_config(cfg.adapter, task_type="CAUSAL_LM"))
    if is_rank0:
        model.print_trainable_parameters()

    preempt = PreemptionCallback(flag)
    metrics_cb = MetricsCallback(
        spec.get("mlflow_run_id"), spec.get("mlflow_tracking_uri"), is_rank0, work_dir / "progress.json"
    )
    callbacks: list[Any] = [preempt, metrics_cb]
    if cfg.adapter.method == "uora":
        callbacks.insert(0, uora.UoraReinitCallback())
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    # --- train (or resume) --------------------------------------------------------------------
    if resume is not None:
        _log(is_rank0, f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if preempt.stopped_at is not None:
        if is_rank0:
            checkpoint = last_complete_checkpoint(ckpt_dir)
            (work_dir / PREEMPTED).write_text(
                json.dumps(
                    {"step": preempt.stopped_at, "checkpoint": str(checkpoint), "signal": preempt.signal_name}
                )
            )
            _log(True, f"preempted at step {preempt.stopped_at}: checkpoint {checkpoint}; rerun to resume")
        barrier()
        return 0

    final_eval = trainer.evaluate()
    digests = all_gather(projection_digest(trainer.model))
    if len(set(digests)) > 1:
        raise TrainingFailed(f"shared projections differ between ranks: {digests}")

    # --- adapter + tokenizer, verified, then metrics and DONE ---------------------------------
    staging = work_dir / (ADAPTER + ".tmp")
    if is_rank0:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the partitioned weights here
    barrier()
    if is_rank0:
        (staging / "training_args.bin").unlink(missing_ok=True)  # pickle; the config is saved as YAML
        tokenizer.save_pretrained(str(staging))
        n_tensors = verify_adapter(staging, trainer.model)
        shutil.rmtree(work_dir / ADAPTER, ignore_errors=True)
        staging.rename(work_dir / ADAPTER)

        history = trainer.state.log_history
        names = sorted(eval_ds) if isinstance(eval_ds, dict) else None
        # With several eval sets the trainer logs one history entry per set.
        at_start = {
            k: v for e in history if e.get("step") == 0 for k, v in e.items() if k.startswith("eval_")
        }
        initial = eval_losses(at_start, names) or None
        after = eval_losses(final_eval, names)
        throughput = [m["tokens_per_second"] for m in metrics_cb.history if "tokens_per_second" in m]
        metrics = {
            "train_loss_mean": float(result.training_loss),
            **{f"eval_loss_after{'.' + k if k else ''}": v for k, v in after.items()},
            "global_step": float(trainer.state.global_step),
            "train_tokens": float(trainer.state.num_input_tokens_seen),
            "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
            "adapter_tensors": float(n_tensors),
            "trainable_params": float(trainer.model.get_nb_trainable_parameters()[0]),
        }
        metrics["peak_rss_mb_rank0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            metrics["peak_cuda_memory_mb_rank0"] = torch.cuda.max_memory_allocated() / 2**20
        if cfg.model.load_in_8bit:
            metrics["base_int8_layers"] = float(_count_int8_layers(trainer.model))
        if initial is not None:
            metrics.update({f"eval_loss_before{'.' + k if k else ''}": v for k, v in initial.items()})
        steady = throughput[1:] or throughput  # the first step includes warm-up
        if steady:
            metrics["tokens_per_second_mean"] = sum(steady) / len(steady)
        step_times = [m["seconds_per_step"] for m in metrics_cb.history if "seconds_per_step" in m]
        if step_times[1:]:  # the first log covers step 1 alone, warm-up included
            metrics["seconds_per_step_median"] = statistics.median(step_times[1:])
        reinits = [e["uora/reinit_events_total"] for e in history if "uora/reinit_events_total" in e]
        if reinits:
            metrics["uora_reinit_events"] = float(max(reinits))
        (work_dir / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if digests[0] is not None:
            (work_dir / "projection_digests.json").write_text(json.dumps(digests))
        (work_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        plot_loss_curve(history, work_dir / LOSS_PNG)
        (work_dir / DONE).write_text("ok\n")
    barrier()
    return 0


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[train] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.stages.train_worker SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        return train(spec)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
