"""One process of an SFT run (``python -m pipeline.stages.train_worker SPEC_JSON``), in-process or under
torchrun/Slurm; the spec the train stage writes holds every input, so a requeued job needs nothing else.
``_train`` is the recipe; below it: devices, preemption, the chat template, metrics, the loss figure."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline import quiet

quiet.install()  # first in a worker process: the imports below load transformers and bitsandbytes

import datasets  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import DistributedType, gather_object  # noqa: E402
from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers.trainer_utils import sort_checkpoints  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.chat_template_utils import has_generation_markers  # noqa: E402

import uora  # noqa: E402  (registers UORA with PEFT)
from pipeline.adapters import build_peft_config  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.digests import sha256  # noqa: E402
from pipeline.errors import StageError  # noqa: E402
from pipeline.models import load_model, load_tokenizer  # noqa: E402
from pipeline.tracking import metric_name  # noqa: E402

# Names in the work folder; DONE is written last (every output is complete), PREEMPTED on a stop.
CHECKPOINTS, ADAPTER, DONE, PREEMPTED = "checkpoints", "adapter", "DONE", "PREEMPTED"
METRICS, LOSS_PNG = "metrics.json", "loss_curve.png"


def projection_digest(model: Any) -> str | None:
    """sha256 of the UORA/VeRA shared projections (None for LoRA), as raw bytes (numpy has no bf16)."""
    raw = {name: b.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
           for name, b in model.named_buffers() if re.search("(uora|vera)_[AB]", name)}  # fmt: skip
    return sha256(*(part for name in sorted(raw) for part in (name, raw[name]))) if raw else None


def _datasets(dataset_dir: Path, max_eval: int | None, completion_only: bool) -> tuple[Any, Any]:
    """The train split and the eval split; the eval split is a ``{metric_name(source): rows}`` dict
    when it holds several sources, so the trainer reports a held-out loss per source."""
    # Mapping a dataset loaded from disk would write cache files into the prepare stage's output.
    datasets.disable_caching()
    if not (dataset_dir / "dataset_dict.json").is_file():
        raise StageError(f"prepared dataset not found: {dataset_dir} (run the 'prepare' stage first)")
    data = datasets.load_from_disk(str(dataset_dir))

    def shaped(rows: Any, cap: int | None = None) -> Any:
        rows = rows.select_columns(["messages"]).take(cap or len(rows))
        return rows.map(to_prompt_completion, remove_columns=["messages"]) if completion_only else rows

    evals, by_name = data["eval"], {}
    labels = evals["source"] if "source" in evals.column_names else []
    for source in sorted(set(labels)) if len(set(labels)) > 1 else []:
        if (name := metric_name(source)) in by_name:
            raise StageError(f"eval sources {source!r} and another map to the same metric name {name!r}")
        by_name[name] = shaped(evals.select([i for i, s in enumerate(labels) if s == source]), max_eval)
    return shaped(data["train"]), by_name or shaped(evals, max_eval)


def eval_losses(metrics: dict[str, Any], names: list[str] | None, key: str) -> dict[str, float]:
    """``{key: overall, key.<name>: per source}`` from trainer eval metrics (one set or per source);
    with several sources the overall loss is their unweighted mean, so each counts the same."""
    if not names:
        return {key: float(metrics["eval_loss"])} if "eval_loss" in metrics else {}
    found = {f"{key}.{n}": float(metrics[f"eval_{n}_loss"]) for n in names if f"eval_{n}_loss" in metrics}
    return {key: sum(found.values()) / len(found), **found} if len(found) == len(names) else {}


def verify_adapter(adapter_dir: Path, model: Any) -> int:
    """The number of tensors in the saved adapter, after checking that every trainable one is there
    with its full (un-partitioned) shape: ZeRO-3 can silently save empty adapters (trl#4416, peft#2892)."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise StageError(f"adapter not saved: {path} missing")
    with safe_open(str(path), framework="pt") as handle:
        saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    empty = [k for k, shape in saved.items() if 0 in shape]
    if not saved or empty:
        raise StageError(f"saved adapter {path} is empty or has empty tensors: {empty[:3]}")
    for name, param in model.named_parameters():
        key = name.replace(f".{model.active_adapter}.", ".").replace(f".{model.active_adapter}", "")
        want = tuple(getattr(param, "ds_shape", param.shape))
        if param.requires_grad and saved.get(key) != want:
            raise StageError(f"saved adapter {path}: tensor {key} is {saved.get(key)}, expected {want}")
    return len(saved)


def train(spec: dict[str, Any]) -> int:
    """Run (or resume) one training process; returns the process exit code."""
    caching, threads = datasets.is_caching_enabled(), torch.get_num_threads()
    try:
        with handling_signals((preempt := PreemptionCallback()).handle, PREEMPT_SIGNALS):
            return _train(spec, preempt)
    finally:  # leave an in-process caller (the driver) as we found it
        torch.set_num_threads(threads)
        if caching:
            datasets.enable_caching()


def _train(spec: dict[str, Any], preempt: PreemptionCallback) -> int:
    work_dir, rank = Path(spec["work_dir"]), os.environ.get("RANK", "0")  # torchrun's global rank
    is_rank0 = rank == "0"

    def log(message: str) -> None:  # rank 0 speaks for all
        if is_rank0:
            print(f"[train] {message}", file=sys.stderr, flush=True)

    (work_dir / "pids").mkdir(parents=True, exist_ok=True)
    (work_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    cfg = PipelineConfig.model_validate(spec["config"])
    tcfg = cfg.train
    use_cpu = tcfg.use_cpu if tcfg.use_cpu is not None else not torch.cuda.is_available()
    device_kwargs = training_args_for_device(use_cpu, bool(tcfg.deepspeed))
    if use_cpu and tcfg.omp_num_threads:  # torchrun workers get it as OMP_NUM_THREADS; in-process too
        torch.set_num_threads(tcfg.omp_num_threads)
    transformers.set_seed(cfg.run.seed)

    # The tokenizer, and the chat template the loss mask comes from.
    tokenizer = load_tokenizer(cfg.model)
    completion_only = False
    if tcfg.assistant_only_loss:
        choice = choose_training_template(tokenizer)
        if choice.template is not None:
            tokenizer.chat_template = choice.template
            log(f"assistant-only loss; chat template: {choice.reason}")
        elif tcfg.template_fallback == "error":
            raise StageError(f"model.chat_template: {choice.reason}; provide a template with "
                                 "{% generation %} markers or set train.template_fallback: completion_only")
        else:
            completion_only = True
            log(f"{choice.reason}: falling back to completion-only loss on the last assistant turn")
    train_ds, eval_ds = _datasets(Path(spec["dataset_dir"]), tcfg.max_eval_samples, completion_only)

    ckpt_dir = work_dir / CHECKPOINTS
    resume = last_complete_checkpoint(ckpt_dir, remove_incomplete=is_rank0)
    # The train section's SFTConfig fields go in as they are; the rest is the stage's own wiring.
    reentrant = {"use_reentrant": False}
    wiring = dict(
        activation_checkpointing=tcfg.activation_checkpointing and not cfg.model.load_in_8bit,
        assistant_only_loss=tcfg.assistant_only_loss and not completion_only,
        eval_on_start=tcfg.eval_on_start and resume is None,
        completion_only_loss=True if completion_only else None,
        eval_strategy="steps" if tcfg.eval_steps else "no",
        output_dir=str(ckpt_dir), seed=cfg.run.seed, data_seed=cfg.run.seed, disable_tqdm=not is_rank0,
        activation_checkpointing_kwargs=reentrant, logging_first_step=True, report_to="none",
        save_strategy="steps", include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        ddp_find_unused_parameters=False, **device_kwargs,
    )  # fmt: skip
    args = SFTConfig(**{**tcfg.sft_kwargs(), **wiring})

    model = load_model(cfg.model)
    model.config.use_cache = False  # the KV cache is useless in training and fights checkpointing
    if cfg.model.load_in_8bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=tcfg.activation_checkpointing,
            gradient_checkpointing_kwargs=reentrant,
        )
    model = get_peft_model(model, build_peft_config(cfg.adapter, task_type="CAUSAL_LM"))
    if is_rank0:
        model.print_trainable_parameters()
    metrics_cb = MetricsCallback(spec["mlflow_run_id"], spec["mlflow_tracking_uri"], is_rank0,
                                 work_dir / "progress.json")
    callbacks = [uora.UoraReinitCallback()] if cfg.adapter.method == "uora" else []
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[*callbacks, preempt, metrics_cb])  # fmt: skip

    if resume is not None:
        log(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if preempt.stopped_at is not None:
        if is_rank0:
            checkpoint = last_complete_checkpoint(ckpt_dir)
            info = {"step": preempt.stopped_at, "checkpoint": str(checkpoint), "signal": preempt.signal_name}
            (work_dir / PREEMPTED).write_text(json.dumps(info))
            log(f"preempted at step {preempt.stopped_at}: checkpoint {checkpoint}; rerun to resume")
        trainer.accelerator.wait_for_everyone()
        return 0

    final_eval = trainer.evaluate()
    digests = gather_object([projection_digest(trainer.model)])
    if len(set(digests)) > 1:
        raise StageError(f"shared projections differ between ranks: {digests}")

    # The adapter and tokenizer, verified, then the metrics and DONE.
    staging = work_dir / (ADAPTER + ".tmp")
    if is_rank0:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank: ZeRO-3 gathers the partitioned weights here
    trainer.accelerator.wait_for_everyone()
    if is_rank0:
        (staging / "training_args.bin").unlink(missing_ok=True)  # pickle; the config is saved as YAML
        tokenizer.save_pretrained(str(staging))
        n_tensors = verify_adapter(staging, trainer.model)
        shutil.rmtree(work_dir / ADAPTER, ignore_errors=True)
        staging.rename(work_dir / ADAPTER)

        history = trainer.state.log_history
        names = sorted(eval_ds) if isinstance(eval_ds, dict) else None
        # With several eval sets the trainer logs one history entry per set.
        at_start = {k: v for e in history if e.get("step") == 0 for k, v in e.items()}
        metrics = {
            "train_loss_mean": float(result.training_loss),
            **eval_losses(at_start, names, "eval_loss_before"),
            **eval_losses(final_eval, names, "eval_loss_after"),
            "global_step": float(trainer.state.global_step),
            "train_tokens": float(trainer.state.num_input_tokens_seen),
            "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
            "adapter_tensors": float(n_tensors),
            "trainable_params": float(trainer.model.get_nb_trainable_parameters()[0]),
            "peak_rss_mb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if torch.cuda.is_available():
            metrics["peak_cuda_memory_mb_rank0"] = torch.cuda.max_memory_allocated() / 2**20
        if cfg.model.load_in_8bit:  # proves an 8-bit base is 8-bit
            from bitsandbytes.nn import Linear8bitLt
            metrics["base_int8_layers"] = float(sum(isinstance(m, Linear8bitLt) for m in model.modules()))
        speeds = [m["tokens_per_second"] for m in metrics_cb.history if "tokens_per_second" in m]
        if steady := speeds[1:] or speeds:  # the first step includes warm-up
            metrics["tokens_per_second_mean"] = sum(steady) / len(steady)
        step_times = [m["seconds_per_step"] for m in metrics_cb.history if "seconds_per_step" in m]
        if step_times[1:]:  # the first log covers step 1 alone, warm-up included
            metrics["seconds_per_step_median"] = statistics.median(step_times[1:])
        if reinits := [e["uora/reinit_events_total"] for e in history if "uora/reinit_events_total" in e]:
            metrics["uora_reinit_events"] = float(max(reinits))
        (work_dir / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if digests[0] is not None:
            (work_dir / "projection_digests.json").write_text(json.dumps(digests))
        (work_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        if (fig := loss_figure(history)) is not None:
            fig.savefig(work_dir / LOSS_PNG, bbox_inches="tight")
        (work_dir / DONE).write_text("ok\n")
    trainer.accelerator.wait_for_everyone()
    return 0


# Processes: devices, preemption, checkpoints.
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def training_args_for_device(use_cpu: bool, deepspeed: bool) -> dict[str, Any]:
    """Extra ``TrainingArguments`` so N processes form ONE training. No DDP buffer broadcast: UORA's shared
    projections (~90 MB a step for Llama-2-7B at r=1024) agree anyway (broadcast once, deterministic
    re-init). CPU DeepSpeed WORKS AROUND accelerate 1.15 (``PartialState.__init__``): DeepSpeed's comm
    on gloo, a MULTI_CPU ``PartialState`` marked DEEPSPEED the Trainer reuses."""
    args: dict[str, Any] = {"ddp_broadcast_buffers": False, **({"use_cpu": True} if use_cpu else {})}
    if not (use_cpu and deepspeed):
        return args
    import deepspeed.comm as ds_comm
    import deepspeed.ops as ds_ops

    if os.environ.get("UORA_DS_SHM_COMM", "0") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op on first CPU init (~100 s on two cores,
        # per machine); gloo is exact and enough. The dict is DeepSpeed's op-compatibility cache.
        ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    state = PartialState(cpu=True, backend="gloo")
    state.distributed_type = DistributedType.DEEPSPEED  # use_cpu stays: TrainingArguments wants it for bf16
    return {**args, "accelerator_config": {"use_configured_state": True}}


@contextlib.contextmanager
def handling_signals(handler: Callable[[int, Any], Any], signals: tuple[int, ...]) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block (in the main thread, the only one Python delivers
    signals to; elsewhere the caller's handlers stay), the previous handlers after it."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handler) for sig in signals} if in_main else {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class PreemptionCallback(transformers.TrainerCallback):
    """``handle`` is the SIGTERM/SIGUSR1 handler; after every optimizer step the ranks OR their flags, so
    a signal that reached only some stops all at the same step (the others would hang): save, stop."""

    signal_name: str | None = None  # this rank's signal; once stopped, whichever rank's
    stopped_at: int | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        stop = self.signal_name is not None
        if dist.is_available() and dist.is_initialized():  # an all-ranks OR: MAX of 0/1
            flag = torch.tensor([int(stop)], dtype=torch.int32, device=PartialState().device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
            self.signal_name = next((name for name in gather_object([self.signal_name]) if name), None)
        return control


def last_complete_checkpoint(folder: Path, remove_incomplete: bool = False) -> Path | None:
    """The highest-step ``checkpoint-N`` holding ``trainer_state.json``, which the Trainer writes last;
    ``remove_incomplete`` (rank 0 only) deletes the ones a crash left without it."""
    found = [Path(path) for path in sort_checkpoints(str(folder))]
    complete = [path for path in found if (path / "trainer_state.json").is_file()]
    for path in set(found) - set(complete) if remove_incomplete else ():
        shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


# The training chat template: TRL masks the loss with ``{% generation %}`` markers, which most models'
# own templates lack. ``pipeline/templates/`` ships marked copies; the one that renders byte-for-byte like
# the model's own on these probes is used: training sees the text inference will (markers are no-ops there).
_PROBES = (
    [("user", "What is 2 + 2?"), ("assistant", "4")],
    [("system", "Answer briefly."), ("user", " Name a colour. "), ("assistant", "Blue."),
     ("user", "Another?"), ("assistant", "Red, or green.\nBoth work.")],
)


# template None: the caller falls back to completion-only loss; source: "model", a shipped name or "none"
TemplateChoice = namedtuple("TemplateChoice", "template source reason")


def shipped_templates() -> dict[str, str]:
    """Name -> Jinja text of every template in ``pipeline/templates``."""
    entries = sorted((resources.files("pipeline") / "templates").iterdir(), key=lambda e: e.name)
    return {e.name.removesuffix(".jinja"): e.read_text("utf-8") for e in entries if e.name.endswith(".jinja")}


def choose_training_template(tokenizer: Any) -> TemplateChoice:
    """The chat template to train with (the tokenizer's is the model's own or ``model.chat_template``)."""
    current = tokenizer.chat_template
    if isinstance(current, dict):  # multi-template tokenizers: the default one is what chat uses
        current = current.get("default")
    if not current:
        return TemplateChoice(None, "none", "the tokenizer has no chat template (set model.chat_template)")
    if has_generation_markers(current):
        return TemplateChoice(current, "model", "the chat template already has generation markers")

    def render(template: str, turns: list[tuple[str, str]], prompt: bool) -> str | None:
        messages = [{"role": role, "content": text} for role, text in turns]
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=prompt)  # fmt: skip
        except Exception:  # a template may refuse a probe (e.g. role alternation): not a match
            return None

    # A shipped template must render every probe the model's own accepts, with and without the prompt.
    cases = [(probe[:-1] if prompt else probe, prompt) for probe in _PROBES for prompt in (False, True)]
    wanted = [(turns, prompt, render(current, turns, prompt)) for turns, prompt in cases]
    for name, text in shipped_templates().items():
        if all(want is None or render(text, turns, prompt) == want for turns, prompt, want in wanted):
            return TemplateChoice(text, name, f"shipped template '{name}' renders like the model's own")
    return TemplateChoice(None, "none", "no shipped template with generation markers renders like this "
                                        "model's chat template")


def to_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    """Completion-only fallback: everything before the last assistant turn is the prompt."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


# Trainer's end-of-training summary (the stage reports its own) and bookkeeping: not logged per step.
_SKIP = {"epoch", "total_flos", "step", "train_loss", "train_runtime", "train_samples_per_second",
         "train_steps_per_second", "train_tokens_per_second"}  # fmt: skip


class MetricsCallback(transformers.TrainerCallback):
    """Adds ``tokens_per_second`` and ``seconds_per_step`` (optimizer steps only, not eval or saving) to
    each log and sends logs to the stage's MLflow run from rank 0 (``MlflowClient``: no active run needed)."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, is_rank0: bool,
                 progress_path: Path | None = None) -> None:  # fmt: skip
        self.run_id, self.is_rank0, self.progress_path = run_id, is_rank0, progress_path
        self.client = None
        if run_id and is_rank0:  # imported here: hosts that track nothing (the GPU kit's) need no mlflow
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri)
        self.history: list[dict[str, float]] = []
        self._mark: tuple[int, int] | None = None  # tokens seen and step at the first step or last log
        self._since = self._busy = 0.0  # when training time last resumed; its sum since the mark

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._since = time.perf_counter()  # the pause since the last step (eval, save) does not count
        self._mark = self._mark or (state.num_input_tokens_seen, state.global_step)  # first of this process

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self._busy, self._since = self._busy + now - self._since, now

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any], **kwargs: Any) -> None:
        metrics = {k: float(v) for k, v in logs.items()
                   if k not in _SKIP and isinstance(v, (int, float)) and math.isfinite(v)}  # fmt: skip
        if "loss" in logs and self._mark is not None:
            now, (tokens, step) = time.perf_counter(), self._mark
            elapsed = self._busy + now - self._since
            if elapsed > 0 and state.num_input_tokens_seen > tokens:
                metrics["tokens_per_second"] = (state.num_input_tokens_seen - tokens) / elapsed
            if elapsed > 0 and state.global_step > step:
                metrics["seconds_per_step"] = elapsed / (state.global_step - step)
            self._mark, self._since, self._busy = (state.num_input_tokens_seen, state.global_step), now, 0.0
        if not self.is_rank0 or not metrics:
            return
        self.history.append({**metrics, "step": float(state.global_step)})
        if self.progress_path is not None:  # for people (and tests) watching a run from outside
            staging = self.progress_path.with_suffix(".tmp")
            staging.write_text(json.dumps({"step": state.global_step, "max_steps": state.max_steps}))
            staging.replace(self.progress_path)
        if self.client is not None:
            stamp = int(time.time() * 1000)
            from mlflow.entities import Metric

            batch = [Metric(key, value, stamp, state.global_step) for key, value in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)


def loss_figure(log_history: list[dict[str, Any]]) -> Any:
    """Train loss against optimizer step; with held-out losses per source, a second panel shows each
    relative to its first value (sources differ in scale: a 4.4 would flatten a 1.2 on one axis),
    labelled with its absolute first → last. Legends sit outside the curves. None without losses."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals: dict[str, list[tuple[int, float]]] = {}  # "eval" or one curve per eval source
    for entry in (e for e in log_history if "step" in e):
        for found in filter(None, map(re.compile(r"eval_(?:(.+)_)?loss").fullmatch, entry)):
            evals.setdefault(found.group(1) or "eval", []).append((entry["step"], entry[found.string]))
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no global figure state to clean up

    per_source = len(evals) > 1
    fig = Figure(figsize=(11 if per_source else 6, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if per_source else 1, squeeze=False)[0]
    left, right = axes[0], axes[-1]  # right: the per-source panel
    if train:
        left.plot(*zip(*train, strict=True), label="train loss")
    held_out = evals.pop("eval", [])
    if per_source:  # left: the unweighted mean over sources (the stage's eval_loss_*); right: each source
        by_step = [dict(points) for points in evals.values()]
        steps = sorted(set.intersection(*(set(points) for points in by_step)))
        held_out = [(step, sum(points[step] for points in by_step) / len(by_step)) for step in steps]
        for name, points in sorted(evals.items()):
            steps, losses = zip(*points, strict=True)
            right.plot(steps, [loss / losses[0] for loss in losses], "o-",
                       label=f"{name}: {losses[0]:.2f} → {losses[-1]:.2f}")  # fmt: skip
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set(xlabel="optimizer step", ylabel="loss ÷ its first value", title="held-out loss per source")
    if held_out:
        left.plot(*zip(*held_out, strict=True), "o-",
                  label="held-out loss" + (" (mean of sources)" if per_source else ""))  # fmt: skip
    left.set(xlabel="optimizer step", ylabel="loss", title="SFT loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m pipeline.stages.train_worker SPEC_JSON", file=sys.stderr)
        return 2
    try:
        return train(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
    except StageError as exc:  # the user can act on it: one line, non-zero exit
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
