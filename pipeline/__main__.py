"""Command line: ``python -m pipeline run|prepare|train|evaluate|export|promote|validate|plan CONFIG ...``.
The config is validated before anything heavy is imported; ``validate`` also plans given ``--gpus-per-node``.
Exit codes: 0 success, 1 a stage failed (``plan``: will not fit), 2 invalid config or command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from pipeline import quiet
from pipeline.stages import STAGE_ORDER

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

COMMANDS = ("run", *STAGE_ORDER, "validate", "plan")
EXIT_CONFIG = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like config errors."""
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(_to_stderr([f"error: {message} (see python -m pipeline --help)"]))


def _to_stderr(lines: list[str]) -> int:
    """Errors and warnings go to stderr, one per line; returns the config-error exit status."""
    print("".join(f"{line}\n" for line in lines), end="", file=sys.stderr)
    return EXIT_CONFIG


def select_stages(command: str, from_stage: str | None, only: str | None) -> list[str]:
    """The stages a command runs, in order; raises ValueError with a one-line reason."""
    named = [name.strip() for name in only.split(",")] if only is not None else []
    for flag, value in [("--from", from_stage)] + [("--only", name) for name in named]:
        if value is not None and value not in STAGE_ORDER:
            raise ValueError(f"{flag}: unknown stage {value!r} (stages: {', '.join(STAGE_ORDER)})")
    if from_stage and only:
        raise ValueError("--from and --only cannot be combined")
    if command in STAGE_ORDER and (from_stage or (only and only != command)):
        raise ValueError(f"'{command}' runs one stage; use 'run' with --from/--only")
    start = STAGE_ORDER.index(from_stage or "prepare")  # a stage command runs just that one
    return [command] if command in STAGE_ORDER else [n for n in STAGE_ORDER[start:] if not only or n in named]


def readiness_warnings(config: Any) -> list[str]:
    """Offline, no torch: an unset judge key, hub weights not cached (warnings: a download may still work)."""
    from pipeline.models import hub_cached, hub_model_id
    judge, lines = config.eval.judge, []
    if judge.backend == "openai" and not os.environ.get(judge.api_key_env):
        lines.append(f"eval.judge.api_key_env: ${judge.api_key_env} is not set; evaluate fails until it is")
    local_judge = judge.local_model if judge.backend == "local" else None
    for field, model in (("model", config.model), ("eval.judge.local_model", local_judge)):
        repo = model and hub_model_id(model)
        if repo and not hub_cached(repo, model.revision):
            lines.append(f"{field}.name_or_path: {repo} is not in the local Hugging Face cache; the first "
                         "stage downloads it (gated models such as Llama-2: accept the licence on the hub, "
                         "then set HF_TOKEN or run hf auth login)")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    quiet.install()
    parser = _Parser(prog="python -m pipeline", description="UORA instruction-tuning pipeline: prepare -> "
                     "train -> evaluate -> export -> promote.")  # fmt: skip
    parser.add_argument("command", help=f"one of: {', '.join(COMMANDS)}")
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", help="start at this stage")
    parser.add_argument("--only", metavar="STAGE[,STAGE]", help="run just these stages (comma-separated)")
    parser.add_argument("--force", action="store_true", help="re-run selected stages even if up to date")
    parser.add_argument("--print-config", action="store_true", help="validate: print the resolved config")
    parser.add_argument("--nodes", type=int, default=1, help="plan: nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, help="plan: GPUs per node (default 1); validate: plan")
    parser.add_argument("--gpu-memory", type=float, metavar="GiB", help="plan: GPU memory (default: read)")
    parser.add_argument("--model-config", metavar="PATH", help="plan: the model's config.json (no download)")
    parser.add_argument("--json", action="store_true", help="plan: print the plan as JSON")
    args = parser.parse_args(argv)
    if args.command not in COMMANDS:
        return _to_stderr([f"unknown command {args.command!r} (commands: {', '.join(COMMANDS)})"])
    from pipeline.config import ConfigError, load_config, to_yaml
    try:
        stages = select_stages(args.command, args.from_stage, args.only)
        config = load_config(args.config, args.overrides)
    except (ValueError, ConfigError) as error:  # a ConfigError's str: its lines
        return _to_stderr([str(error)])
    if args.command == "validate":
        if args.print_config:
            print(to_yaml(config), end="")
        _to_stderr([f"warning: {line}" for line in readiness_warnings(config)])
        elapsed = time.perf_counter() - started
        print(f"{args.config}: valid (run dir {config.run_dir}, validated in {elapsed:.2f} s)")
        return 0 if args.gpus_per_node is None else run_plan(config, args, warn_only=True)
    if args.command == "plan":
        return run_plan(config, args)
    from pipeline.driver import run_pipeline
    return run_pipeline(config, stages=stages, force=args.force, config_path=args.config)


def run_plan(config: PipelineConfig, args: argparse.Namespace, warn_only: bool = False) -> int:
    """``plan``: the table (or JSON), exit 1 when it will not fit; for ``validate``, a warning only."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.plan import PlanError, plan
    gpus = 1 if args.gpus_per_node is None else args.gpus_per_node
    try:
        result = plan(config, nodes=args.nodes, gpus_per_node=gpus, gpu_memory=args.gpu_memory,
                      model_config_path=args.model_config)  # fmt: skip
    except PlanError as error:
        _to_stderr([f"warning: plan skipped: {error}" if warn_only else str(error)])
        return 0 if warn_only else EXIT_CONFIG
    gpu, batch, hours = result["per_gpu"], result["max_per_device_batch"], result["hours_estimate"]
    need = f"{gpu['total_gb']:.1f} GiB per GPU of {gpu['capacity_gb']:.1f}"
    part = max(("weights_gb", "adapter_states_gb", "activations_gb", "logits_gb"), key=gpu.__getitem__)
    hint = f"largest per-device batch that fits: {batch}" if batch else "not even a batch of 1 fits"
    verdict = (f"fits: {need}; {hint}" if result["fits"]
               else f"will not fit: needs {need} (largest part: {part[:-3]} {gpu[part]:.1f} GiB); {hint}")
    if not warn_only and args.json:
        print(json.dumps(result, indent=2))
    elif not warn_only:
        table = Table("per GPU", "GiB")
        for key, value in gpu.items():
            table.add_row(key[:-3].replace("_", " "), f"{value:.2f}")
        lines = [f"{result['total_params']:,} parameters, {result['trainable_params']:,} trainable", table,
                 verdict, f"~{result['tokens_per_second_estimate']:,.0f} tokens/s, "
                 f"{'unknown' if hours is None else f'{hours:.2f}'} hours"]  # fmt: skip
        lines += [f"  {key}: {value}" for key, value in result["assumptions"].items()]
        Console().print(*lines, sep="\n", highlight=False)
    if not result["fits"]:
        print(("warning: " if warn_only else "") + verdict, file=sys.stderr)
    return 0 if warn_only or result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
