"""The exported folder is a plain transformers model: a fresh Python process in which neither
``uora`` nor ``pipeline`` can be imported loads it and reproduces base + adapter's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from export_helpers import finish, make_config, make_ctx, require_uora, write_adapter
from test_export_merge import CHECK_PROMPTS, reference_logits

from pipeline.stages import export

# Runs in the child. The venv has this project installed in editable mode, whose finder the
# site module installs at start-up; remove it and any sys.path entry that holds either package,
# then prove that neither imports before touching the model.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path_importer_cache.clear()
    sys.path[:] = [p for p in sys.path if not any(
        os.path.isdir(os.path.join(p or ".", name)) for name in ("uora", "pipeline"))]
    missing = {name: importlib.util.find_spec(name) is None for name in ("uora", "pipeline")}
    assert all(missing.values()), missing

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders, prompts, out = json.loads(sys.argv[1])
    results = {}
    for key, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        rows = []
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                    add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
                rows.append(model(input_ids=ids).logits[0].float())
        results[key] = torch.cat(rows)
        results[key + ".class"] = type(model).__name__
        results[key + ".modules"] = sorted({n.split(".")[0] for n in sys.modules})
    torch.save(results, out)
    print(json.dumps(missing))
    """
)


def methods() -> list[str]:
    try:
        require_uora()
        return ["lora", "vera", "uora"]
    except pytest.skip.Exception:
        return ["lora", "vera"]


@pytest.mark.slow
def test_export_loads_in_fresh_process_without_project_code(tmp_path, tiny_base_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    folders, references = {}, {}
    for method in methods():
        run_dir = tmp_path / method
        write_adapter(run_dir, AutoModelForCausalLM.from_pretrained(tiny_base_dir), smollm2_tokenizer, method)
        ctx = make_ctx(run_dir, make_config(tiny_base_dir))
        export.run(ctx)
        folders[method] = str(finish(ctx) / "merged")
        references[method], _ = reference_logits(
            tiny_base_dir, run_dir / "train" / "adapter", smollm2_tokenizer
        )

    outside = tmp_path / "elsewhere"  # cwd outside the repository
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    out = tmp_path / "child.pt"
    args = json.dumps([folders, CHECK_PROMPTS, str(out)])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, args], cwd=outside, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"uora": True, "pipeline": True}

    child = torch.load(out)
    for method, reference in references.items():
        assert child[f"{method}.class"] == "LlamaForCausalLM"
        assert not {"uora", "pipeline", "peft"} & set(child[f"{method}.modules"]), method
        assert float((child[method] - reference).abs().max()) < 1e-4, method


def test_child_script_really_hides_the_project(tmp_path):
    """The sanitising preamble is what makes the test above meaningful: without it, the
    project is importable in a child process of this venv; with it, it is not."""
    preamble = CHILD.split("import torch")[0]
    probe = "import importlib.util; print(importlib.util.find_spec('pipeline') is not None)"
    repo = str(Path(export.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo}
    plain = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert plain.stdout.strip() == "True"
    hidden = subprocess.run(
        [sys.executable, "-c", preamble + "\nprint('hidden')"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert hidden.returncode == 0 and hidden.stdout.strip() == "hidden", hidden.stderr[-2000:]
