"""The papers' trainable-parameter table, recomputed from the real PEFT models and checked row by row.

    python benchmarks/paper_param_counts.py   # prints the table; writes benchmarks/results/
                                               # paper_param_counts.{md,csv}; exit 1 on any mismatch

Each row builds the base model from its published shape (RoBERTa-base/large, GPT-2 Medium,
Llama-2-7B/13B; configs only) and wraps it with LoRA, VeRA or UORA under the row's target modules
and rank, all inside `torch.device("meta")`: no weight is allocated, so the whole table takes
seconds. "counted" is PEFT's trainable-parameter count of the adapter alone — UORA/VeRA
Σ(out + r), LoRA Σ r·(in + out) over the adapted layers — which is what the papers report: no
classifier or pooler head (the RoBERTa rows use the bare encoder), no frozen A/B projections, no
lm_head (Llama "all linear layers" means every linear layer but lm_head; the `all-linear` row
checks that PEFT's shorthand excludes it too). Published numbers and settings: the VeRA paper
(arXiv 2310.11454) and the UORA paper (arXiv 2505.20154); they tabulate trainable parameters only,
not stored (saved) sizes, so neither does this script.
VeRA and UORA share the count formula, so each of their rows must give the same number.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: use this checkout's uora, not an installed one
    sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftConfig, VeraConfig  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    RobertaConfig,
    RobertaModel,
)

from pipeline.plan import peft_on_meta  # noqa: E402
from uora import UoraConfig  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("query", "value")


def _roberta(hidden: int, layers: int, heads: int) -> PreTrainedModel:
    config = RobertaConfig(
        vocab_size=50265,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=514,
        type_vocab_size=1,
    )
    return RobertaModel(config, add_pooling_layer=False)  # the head is not part of the adapter count


def _llama(hidden: int, intermediate: int, layers: int, heads: int) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    return LlamaForCausalLM(config)


# The published shapes (the models' config.json on the hub), so no download is needed.
MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "roberta-base": lambda: _roberta(768, 12, 12),
    "roberta-large": lambda: _roberta(1024, 24, 16),
    "gpt2-medium": lambda: GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
    "llama-2-7b": lambda: _llama(4096, 11008, 32, 32),
    "llama-2-13b": lambda: _llama(5120, 13824, 40, 40),
}

METHODS: dict[str, Callable[[int, list[str] | str], PeftConfig]] = {
    "LoRA": lambda r, targets: LoraConfig(r=r, target_modules=targets),
    "VeRA": lambda r, targets: VeraConfig(r=r, target_modules=targets),
    "UORA": lambda r, targets: UoraConfig(r=r, target_modules=targets),
}


@dataclass(frozen=True)
class Spec:
    """One row of the published table: which adapter on which model, and the number printed for it."""

    model: str  # a key of MODELS
    method: str  # a key of METHODS
    rank: int
    targets: tuple[str, ...] | str  # module names, or PEFT's "all-linear" shorthand
    published: int
    paper: str = ""  # how the paper prints it, where it rounds ("1.6M")


@dataclass(frozen=True)
class Row:
    """A Spec with the count PEFT gives for it."""

    model: str
    method: str
    rank: int
    targets: str
    counted: int
    published: int
    paper: str
    match: bool


def _both(model: str, rank: int, targets: tuple[str, ...], published: int, paper: str = "") -> list[Spec]:
    """VeRA and UORA rows for one setting: the papers' Σ(out + r) holds for both."""
    return [Spec(model, method, rank, targets, published, paper) for method in ("VeRA", "UORA")]


ROWS: list[Spec] = [
    *_both("roberta-base", 1024, QV, 43_008, "0.043M"),
    *_both("roberta-large", 256, QV, 61_440),
    *_both("gpt2-medium", 1024, ("c_attn",), 98_304),  # fused q/k/v projection, as in VeRA's setup
    *_both("llama-2-7b", 1024, LLAMA_LINEAR, 1_589_248, "1.6M"),
    Spec("llama-2-7b", "UORA", 1024, "all-linear", 1_589_248, "1.6M"),
    *_both("llama-2-7b", 256, LLAMA_LINEAR, 1_417_216, "1.4M"),
    Spec("llama-2-7b", "LoRA", 64, LLAMA_LINEAR, 159_907_840),
    *_both("llama-2-13b", 1024, LLAMA_LINEAR, 2_416_640),
    Spec("llama-2-13b", "LoRA", 64, LLAMA_LINEAR, 250_347_520),
]


def _targets_label(targets: tuple[str, ...] | str) -> str:
    if isinstance(targets, str):
        return targets
    return "all linear but lm_head" if targets == LLAMA_LINEAR else "+".join(targets)


def count_trainable(spec: Spec) -> int:
    """PEFT's trainable-parameter count for one spec, built on the meta device (shapes only)."""
    if spec.model not in MODELS:
        raise ValueError(f"unknown model {spec.model!r} (known: {', '.join(MODELS)})")
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r} (known: {', '.join(METHODS)})")
    targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
    # The same meta-device build as `python -m pipeline plan`: base and adapter weights stay unallocated.
    model = peft_on_meta(MODELS[spec.model], METHODS[spec.method](spec.rank, targets))
    return model.get_nb_trainable_parameters()[0]


def count_rows(specs: Sequence[Spec] = ROWS) -> list[Row]:
    """Count every spec and compare it with its published number."""
    rows = []
    for spec in specs:
        counted = count_trainable(spec)
        rows.append(
            Row(
                model=spec.model,
                method=spec.method,
                rank=spec.rank,
                targets=_targets_label(spec.targets),
                counted=counted,
                published=spec.published,
                paper=spec.paper,
                match=counted == spec.published,
            )
        )
    return rows


def markdown(rows: Sequence[Row]) -> str:
    """The table with a header naming the command and the library versions it was computed with."""
    lines = [
        "# The papers' parameter-count table, recomputed",
        "",
        f"`python benchmarks/paper_param_counts.py` — trainable adapter parameters from PEFT "
        f"{peft.__version__} / transformers {transformers.__version__} / torch {torch.__version__}, "
        "models built on the meta device from the published shapes. Counted: the adapter's trainable "
        "parameters only (no classifier/pooler head, no frozen A/B projections, no lm_head). Published: "
        "the VeRA (arXiv 2310.11454) and UORA (arXiv 2505.20154) papers.",
        "",
        "| model | method | rank | targets | counted | published | paper prints | result |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        cells = [row.model, row.method, str(row.rank), row.targets, f"{row.counted:,}", f"{row.published:,}"]
        cells += [row.paper or "—", "match" if row.match else "**MISMATCH**"]
        lines.append("| " + " | ".join(cells) + " |")
    mismatches = sum(not row.match for row in rows)
    lines += ["", f"{len(rows) - mismatches} of {len(rows)} rows match the published numbers."]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(Row.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**asdict(row), "match": "match" if row.match else "mismatch"})
    return buffer.getvalue()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader never sees half a table


def run(specs: Sequence[Spec], output_dir: Path) -> int:
    """Count, print and write the table; the exit status: 0 if every row matches, else 1."""
    rows = count_rows(specs)
    text = markdown(rows)
    print(text, end="")
    output_dir.mkdir(parents=True, exist_ok=True)
    _write(output_dir / "paper_param_counts.md", text)
    _write(output_dir / "paper_param_counts.csv", to_csv(rows))
    return 0 if all(row.match for row in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where paper_param_counts.md and .csv go (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    return run(ROWS, args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
