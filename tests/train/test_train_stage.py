"""The train stage in-process on a tiny model: 8-bit base, outputs, failure messages."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_config, make_ctx, write_prepared

from pipeline.stages import train
from pipeline.stages.base import StageError


@pytest.mark.slow
def test_8bit_base_trains_and_saves(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    run_dir = tmp_path / "run8"
    write_prepared(run_dir)
    config = make_config(run_dir, str(tiny_model_dir), model={"load_in_8bit": True}, train={"max_steps": 3})
    result = train.run(make_ctx(run_dir, config))
    work = run_dir / "train.partial"
    assert (work / "DONE").is_file()
    adapter = load_file(work / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    # LoRA B starts at zero: a non-zero B proves optimizer steps reached the adapter
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert result.metrics["global_step"] == 3
    assert torch.isfinite(torch.tensor(result.metrics["train_loss_mean"]))
    # the base really was int8 (bitsandbytes), not silently full precision
    assert result.metrics["base_int8_layers"] > 0
    history = json.loads((work / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]


def test_missing_prepared_data_is_one_clear_error(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "nodata"
    config = make_config(run_dir, str(tiny_model_dir))
    with pytest.raises(StageError, match=r"stage input missing: .*prepare"):
        train.run(make_ctx(run_dir, config))


def test_8bit_base_with_zero3_is_rejected_at_validation(tmp_path):
    from pipeline.config import ConfigError, load_config

    zero3 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"
    config = tmp_path / "c.yaml"
    config.write_text(
        "run: {name: x}\nmodel: {name_or_path: some/model, load_in_8bit: true}\n"
        f"train: {{deepspeed: {zero3}, nproc_per_node: 2}}\n"
    )
    with pytest.raises(ConfigError, match=r"model\.load_in_8bit.*ZeRO-3"):
        load_config(config)


def test_no_usable_template_fails_clearly_when_fallback_is_off(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "tmpl"
    write_prepared(run_dir, n_train=4, n_eval=2)
    config = make_config(
        run_dir,
        str(tiny_model_dir),
        model={"chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"},
        train={"template_fallback": "error"},
    )
    with pytest.raises(StageError, match=r"^model\.chat_template: no shipped template .*generation"):
        train.run(make_ctx(run_dir, config))
    assert not (run_dir / "train.partial" / "DONE").exists()


@pytest.mark.slow
def test_no_usable_template_falls_back_to_completion_only_loss(tmp_path, tiny_model_dir, capfd):
    run_dir = tmp_path / "fallback"
    write_prepared(run_dir, n_train=8, n_eval=2)
    config = make_config(
        run_dir,
        str(tiny_model_dir),
        model={"chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"},
        train={"max_steps": 2},
    )
    result = train.run(make_ctx(run_dir, config))
    assert "falling back to completion-only loss" in capfd.readouterr().err
    assert result.metrics["global_step"] == 2


@pytest.mark.slow
def test_checkpoints_of_another_config_are_not_resumed(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "stale"
    write_prepared(run_dir, n_train=8, n_eval=2)
    work = run_dir / "train.partial"
    stale = work / "checkpoints" / "checkpoint-99"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")  # would crash the Trainer if resumed
    (work / "train_spec.json").write_text(json.dumps({"identity": "from-another-config"}))
    result = train.run(make_ctx(run_dir, make_config(run_dir, str(tiny_model_dir), train={"max_steps": 2})))
    assert result.metrics["global_step"] == 2
    assert not stale.exists()


# |d| starts at 0.1, below the threshold: every slot of the 6 adapted layers has an event every step
UORA_FORCED = {"method": "uora", "r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "reinit_threshold": 0.5}  # fmt: skip


def _signal_after_first_step(work: Path, sig: int) -> None:
    """From a thread: send ``sig`` to this process once training has logged a step."""
    import threading
    import time

    def wait_and_send() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if json.loads((work / "progress.json").read_text())["step"] >= 1:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait_and_send, daemon=True).start()


@pytest.mark.slow
def test_eval_only_edit_of_a_preempted_run_resumes_its_checkpoint(tmp_path, tiny_model_dir, capfd):
    """Preempt, change eval.max_new_tokens, rerun: training resumes from the saved checkpoint (it
    used to start over, deleting the checkpoints) and ends with the adapter of an uninterrupted run."""
    import signal

    from pipeline.stages.base import StagePreempted

    sections = {"adapter": UORA_FORCED, "train": {"max_steps": 8, "eval_on_start": False}}
    reference_dir = tmp_path / "uninterrupted"
    write_prepared(reference_dir, n_train=32, n_eval=2)
    train.run(make_ctx(reference_dir, make_config(reference_dir, str(tiny_model_dir), **sections)))

    run_dir = tmp_path / "preempted"
    write_prepared(run_dir, n_train=32, n_eval=2)
    work = run_dir / "train.partial"
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a late signal must not end pytest
    try:
        _signal_after_first_step(work, signal.SIGUSR1)
        with pytest.raises(StagePreempted):
            train.run(make_ctx(run_dir, make_config(run_dir, str(tiny_model_dir), **sections)))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    step = json.loads((work / "PREEMPTED").read_text())["step"]
    assert 1 <= step < 8 and (work / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()

    capfd.readouterr()
    edited = make_config(run_dir, str(tiny_model_dir), eval={"max_new_tokens": 7}, **sections)
    result = train.run(make_ctx(run_dir, edited))
    assert f"resuming from {work / 'checkpoints' / f'checkpoint-{step}'}" in capfd.readouterr().err
    assert result.metrics["global_step"] == 8
    got = load_file(work / "adapter" / "adapter_model.safetensors")
    want = load_file(reference_dir / "train.partial" / "adapter" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6, msg=key)
    assert result.metrics["uora_reinit_events"] == 8 * 6 * 8  # A/B moved at every step, resumed or not


@pytest.mark.slow
def test_bf16_training_keeps_float32_projections(tmp_path, tiny_model_dir):
    """`train.bf16: true` on a bf16 base, on CPU (torch's bf16 autocast), with an event on every slot
    at every step: the saved A and B are float32 and hold the float32 interpolation exactly."""
    from safetensors import safe_open
    from train_helpers import forced_projections

    run_dir = tmp_path / "bf16"
    write_prepared(run_dir, n_train=16, n_eval=2)
    config = make_config(run_dir, str(tiny_model_dir), model={"dtype": "bfloat16"}, adapter=UORA_FORCED,
                         train={"max_steps": 3, "bf16": True, "eval_on_start": False})  # fmt: skip
    result = train.run(make_ctx(run_dir, config))
    assert result.metrics["uora_reinit_events"] == 3 * 6 * 8
    with safe_open(str(run_dir / "train.partial" / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        a, b = saved.get_tensor("base_model.uora_A"), saved.get_tensor("base_model.uora_B")
    want_a, want_b = forced_projections(a.shape, b.shape, layers=6, steps=3)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, want_a, rtol=0, atol=1e-6)  # bf16 rounding would be ~1e-3
    torch.testing.assert_close(b, want_b, rtol=0, atol=1e-6)


class _Terminated(BaseException):
    """Stands in for the driver's SIGTERM exception."""


@pytest.mark.slow
def test_in_process_sigterm_checkpoints_then_reaches_the_callers_handler(tmp_path, tiny_model_dir):
    import signal

    run_dir = tmp_path / "term"
    write_prepared(run_dir, n_train=32, n_eval=2)
    config = make_config(run_dir, str(tiny_model_dir), train={"max_steps": 12})
    work = run_dir / "train.partial"

    def driver_handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, driver_handler)
    try:
        _signal_after_first_step(work, signal.SIGTERM)
        with pytest.raises(_Terminated):
            train.run(make_ctx(run_dir, config))
    finally:
        signal.signal(signal.SIGTERM, previous)
    marker = json.loads((work / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and 1 <= marker["step"] < 12
    assert not (work / "DONE").exists()

    result = train.run(make_ctx(run_dir, config))  # the same call resumes and finishes
    assert result.metrics["global_step"] == 12 and (work / "DONE").is_file()
    history = json.loads((work / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 13))


@pytest.mark.slow
def test_packing_puts_several_conversations_in_one_sequence(tmp_path, tiny_model_dir):
    """`train.packing: true` (best-fit decreasing) packs rows: one epoch takes fewer optimizer
    steps than unpacked, over the same rows and tokens, and still trains with a finite loss."""
    steps, tokens = {}, {}
    for packing in (False, True):
        run_dir = tmp_path / f"packing-{packing}"
        write_prepared(run_dir, n_train=32)
        config = make_config(run_dir, str(tiny_model_dir),
                             train={"max_steps": -1, "num_train_epochs": 1, "max_length": 256,
                                    "packing": packing, "per_device_train_batch_size": 2})  # fmt: skip
        result = train.run(make_ctx(run_dir, config))
        assert (run_dir / "train.partial" / "DONE").is_file()
        assert torch.isfinite(torch.tensor(result.metrics["train_loss_mean"]))
        steps[packing], tokens[packing] = result.metrics["global_step"], result.metrics["train_tokens"]
    assert steps[False] == 16  # 32 rows, 2 per step
    assert steps[True] < steps[False] / 2  # rows of ~40 tokens: several per 256-token sequence
    # ...but no more than 256 tokens per packed sequence, so all rows' tokens still need this many
    # steps (tokens counted unpacked: packed batches carry no attention mask, and SmolLM2's pad
    # token is its <|im_end|>, so the trainer's non-padding count skips those in packed batches)
    assert steps[True] >= math.ceil(tokens[False] / (256 * 2))


def test_eval_loss_per_source_and_step_timing(tmp_path, tiny_model_dir):
    """An eval split with two sources gives one held-out loss per source (their mean is the
    overall loss), before and after training; step time and trainable parameters are reported."""
    from datasets import Dataset, DatasetDict
    from train_helpers import make_messages

    run_dir = tmp_path / "run"
    rows = make_messages(12, 1)
    evals = Dataset.from_dict({"messages": rows, "source": ["gsm8k"] * 8 + ["role play.json"] * 4,
                               "answer": [None] * 12})  # fmt: skip
    train_rows = make_messages(16, 0)
    train_set = Dataset.from_dict({"messages": train_rows, "source": ["x"] * 16, "answer": [None] * 16})
    DatasetDict({"train": train_set, "eval": evals}).save_to_disk(str(run_dir / "prepare" / "dataset"))
    config = make_config(run_dir, str(tiny_model_dir), train={"max_steps": 4, "max_eval_samples": 3})
    metrics = train.run(make_ctx(run_dir, config)).metrics
    for when in ("before", "after"):
        # source labels become metric names by MLflow's rule, as evaluate's categories do
        per_source = [metrics[f"eval_loss_{when}.gsm8k"], metrics[f"eval_loss_{when}.role play.json"]]
        assert all(math.isfinite(v) for v in per_source) and per_source[0] != per_source[1]
        assert metrics[f"eval_loss_{when}"] == pytest.approx(sum(per_source) / 2)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # LoRA r=4 on q_proj and v_proj of 2 layers (hidden 32, 2 KV heads of 8): A 4x32 each, B 32x4 / 16x4.
    assert metrics["trainable_params"] == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert metrics["seconds_per_step_median"] > 0
    history = json.loads((run_dir / "train.partial" / "log_history.json").read_text())
    evaluated = [e for e in history if "eval_gsm8k_loss" in e]
    assert [e["step"] for e in history if "eval_role play.json_loss" in e] == [0, 4]
    assert [e["step"] for e in evaluated] == [0, 4]  # before the first step and at the end
    assert all("seconds_per_step" not in e for e in evaluated)


def test_step_time_leaves_out_evaluation(monkeypatch):
    """seconds_per_step covers optimizer steps: time spent evaluating between steps is excluded."""
    from types import SimpleNamespace

    from pipeline.stages import train_worker

    # perf_counter at: step 1 begins, step 1 ends, step 2 begins (after a 10 s eval), step 2 ends, log
    clock = iter([0.0, 1.0, 11.0, 12.0, 12.5])
    monkeypatch.setattr(train_worker.time, "perf_counter", lambda: next(clock))
    callback = train_worker.MetricsCallback(None, None, is_rank0=True)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    callback.on_step_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 1, 100
    callback.on_step_end(None, state, None)
    callback.on_step_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 2, 200
    callback.on_step_end(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 1.0})
    assert callback.history[-1]["seconds_per_step"] == pytest.approx((12.5 - 10.0) / 2)
    assert callback.history[-1]["tokens_per_second"] == pytest.approx(200 / 2.5)


def test_projection_digest_hashes_bf16_projections(tiny_llama):
    """The ranks' projection digests must work whatever the buffers' dtype (numpy has no bfloat16,
    which raised TypeError). UORA's A/B stay float32 now, but VeRA's follow a whole-model cast."""
    from peft import VeraConfig, get_peft_model

    from pipeline.stages.train_worker import projection_digest

    model = get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"])).to(torch.bfloat16)
    buffers = [b for n, b in model.named_buffers() if "vera_A" in n]
    assert buffers and buffers[0].dtype == torch.bfloat16
    digest = projection_digest(model)
    assert digest is not None and len(digest) == 64
    buffers[0].view(-1)[0] += 1
    assert projection_digest(model) != digest
