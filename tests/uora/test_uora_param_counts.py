"""Trainable-parameter counts reproduce the published table: the rows of
benchmarks/paper_param_counts.py (models built on the meta device), and the script's outputs."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from benchmarks import paper_param_counts as ppc


@pytest.fixture(scope="module")
def rows() -> list[ppc.Row]:
    return ppc.count_rows()


def test_every_published_row_is_reproduced(rows):
    assert [(r.model, r.method, r.rank, r.counted) for r in rows] == [
        (s.model, s.method, s.rank, s.published) for s in ppc.ROWS
    ]
    assert all(r.match for r in rows)


def test_the_table_covers_every_model_and_method():
    assert {s.model for s in ppc.ROWS} == set(ppc.MODELS)
    assert {s.method for s in ppc.ROWS} == {"LoRA", "VeRA", "UORA"}


def test_uora_counts_equal_vera_counts(rows):
    """Σ(out + r) for both: the same setting must give the same number whichever method."""
    by_setting: dict[tuple, set[int]] = {}
    for r in rows:
        if r.method in ("VeRA", "UORA"):
            by_setting.setdefault((r.model, r.rank, r.targets), set()).add(r.counted)
    assert len(by_setting) >= 6
    assert all(len(counts) == 1 for counts in by_setting.values())


def test_all_linear_shorthand_excludes_lm_head(rows):
    """PEFT's "all-linear" on Llama must equal the explicit list without lm_head (32000 × 4096 more
    outputs would add 32,000 + r if lm_head were adapted)."""
    counts = {
        r.targets: r.counted for r in rows if (r.model, r.method, r.rank) == ("llama-2-7b", "UORA", 1024)
    }
    assert counts == {"all linear but lm_head": 1_589_248, "all-linear": 1_589_248}


def test_main_writes_matching_table(tmp_path, capsys):
    assert ppc.main(["--output-dir", str(tmp_path)]) == 0
    with open(tmp_path / "paper_param_counts.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(ppc.ROWS)
    assert written[0] == {
        "model": "roberta-base",
        "method": "VeRA",
        "rank": "1024",
        "targets": "query+value",
        "counted": "43008",
        "published": "43008",
        "paper": "0.043M",
        "match": "match",
    }
    assert {w["match"] for w in written} == {"match"}
    md = (tmp_path / "paper_param_counts.md").read_text()
    assert (
        "| llama-2-13b | LoRA | 64 | all linear but lm_head | 250,347,520 | 250,347,520 | — | match |" in md
    )
    assert f"{len(ppc.ROWS)} of {len(ppc.ROWS)} rows match the published numbers." in md
    assert capsys.readouterr().out == md


def test_wrong_published_number_is_a_mismatch_and_exit_1(tmp_path):
    wrong = dataclasses.replace(ppc.ROWS[0], published=43_009)
    assert ppc.run([wrong, ppc.ROWS[1]], tmp_path) == 1
    with open(tmp_path / "paper_param_counts.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [(w["counted"], w["published"], w["match"]) for w in written] == [
        ("43008", "43009", "mismatch"),
        ("43008", "43008", "match"),
    ]
    md = (tmp_path / "paper_param_counts.md").read_text()
    assert "| 43,008 | 43,009 | 0.043M | **MISMATCH** |" in md
    assert "1 of 2 rows match the published numbers." in md


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match=r"^unknown model 'gpt-5' \(known: roberta-base, "):
        ppc.count_trainable(ppc.Spec("gpt-5", "UORA", 8, ("q_proj",), 0))
