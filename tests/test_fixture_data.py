"""The committed data excerpts (tests/fixtures/data) and the rule that no test skips for missing data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.eval.prompts import BUILTIN_PROMPTS, load_prompt_file
from pipeline.eval.questions import load_reference_answers, read_question_file
from tests.conftest import FIXTURE_DATA, SHARED_DATA

CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


def test_a_skip_for_missing_data_fails_and_other_skips_stay_skips(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        """
        import pytest

        def test_needs_data():
            pytest.skip("shared data not found at /x/shared/data (or set UORA_SHARED_DATA)")

        @pytest.fixture
        def data():
            pytest.skip("MT-Bench data file missing")

        def test_needs_data_through_a_fixture(data):
            pass

        def test_needs_slurm():
            pytest.skip("Slurm is not installed (sbatch not found)")

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*skipped for missing data (Skipped: shared data not found at /x*"])


def test_fixture_excerpts_load_through_the_project_readers():
    mt_bench = FIXTURE_DATA / "mt_bench"
    questions = read_question_file(mt_bench / "question.jsonl")
    assert Counter(q.category for q in questions) == {category: 2 for category in CATEGORIES}
    guided = {str(q.question_id) for q in questions if q.category in ("reasoning", "math", "coding")}
    assert set(load_reference_answers(mt_bench / "reference_answer_gpt-4.jsonl")) == guided
    assert set(load_prompt_file(mt_bench / "judge_prompts.jsonl")) == set(BUILTIN_PROMPTS)
    for name in ("gsm8k_train_alpaca.json", "gpteacher_roleplay.json"):
        alpaca = rows(FIXTURE_DATA / "instruct" / name)
        assert len(alpaca) == 48 and all(set(row) == {"instruction", "input", "output"} for row in alpaca)


@pytest.mark.parametrize(
    "name",
    ["mt_bench/question.jsonl", "mt_bench/reference_answer_gpt-4.jsonl", "mt_bench/judge_prompts.jsonl",
     "instruct/gsm8k_train_alpaca.json", "instruct/gpteacher_roleplay.json",
     "instruct/self_instruct_seed_tasks.jsonl"],
)  # fmt: skip
def test_fixture_excerpts_are_verbatim_rows_of_the_full_files(name):
    """Where the full files are (../shared/data: CI), every excerpt row is one of theirs, in order;
    on a fresh clone this checks the excerpt is non-empty JSON rows."""
    excerpt = rows(FIXTURE_DATA / name)
    assert excerpt and all(isinstance(row, dict) for row in excerpt)
    if (SHARED_DATA / name).is_file():
        full = rows(SHARED_DATA / name)
        assert [row for row in full if row in excerpt] == excerpt
