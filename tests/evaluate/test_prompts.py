"""Judge prompt choice and rendering, with our texts and with FastChat's judge_prompts.jsonl."""

from __future__ import annotations

import re

import pytest

from pipeline.eval.prompts import (
    BUILTIN_PROMPTS,
    PAIR_NAMES,
    load_prompt_file,
    load_prompts,
    pair_fields,
    prompt_fields,
    prompt_name,
)
from pipeline.stages.base import StageError

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@pytest.mark.parametrize("category", CATEGORIES)
def test_reference_guided_exactly_for_math_reasoning_coding(category):
    guided = category in ("math", "reasoning", "coding")
    assert prompt_name(category, 1, has_reference=True) == ("single-math-v1" if guided else "single-v1")
    assert prompt_name(category, 2, has_reference=True) == (
        "single-math-v1-multi-turn" if guided else "single-v1-multi-turn"
    )
    # without a reference there is nothing to guide with
    assert prompt_name(category, 1, has_reference=False) == "single-v1"
    assert prompt_name(category, 2, has_reference=False) == "single-v1-multi-turn"


def _placeholders(text):
    return set(re.findall(r"\{(\w+)\}", text))


def test_fastchat_prompt_file_loads_and_matches_our_placeholders(shared_data):
    theirs = load_prompt_file(shared_data / "mt_bench" / "judge_prompts.jsonl")
    assert set(theirs) == set(BUILTIN_PROMPTS)
    for name, prompt in theirs.items():
        assert _placeholders(prompt.prompt_template) == _placeholders(BUILTIN_PROMPTS[name].prompt_template)
        assert prompt.output_format == "[[rating]]"
    assert load_prompts(str(shared_data / "mt_bench" / "judge_prompts.jsonl")) == theirs
    assert load_prompts(None) == BUILTIN_PROMPTS


@pytest.mark.parametrize("source", ["builtin", "fastchat"])
def test_rendered_prompts_show_what_the_judge_needs(source, shared_data):
    prompts = (
        BUILTIN_PROMPTS
        if source == "builtin"
        else load_prompt_file(shared_data / "mt_bench" / "judge_prompts.jsonl")
    )
    turns, answers, ref = ("Q-ONE", "Q-TWO"), ["A-ONE", "A-TWO"], ("R-ONE", "R-TWO")
    first = prompts["single-math-v1"].render(**prompt_fields(turns, answers, ref, 1))
    assert all(s in first for s in ("Q-ONE", "A-ONE", "R-ONE")) and "Q-TWO" not in first
    second = prompts["single-math-v1-multi-turn"].render(**prompt_fields(turns, answers, ref, 2))
    assert all(s in second for s in ("Q-ONE", "A-ONE", "Q-TWO", "A-TWO", "R-ONE", "R-TWO"))
    general = prompts["single-v1-multi-turn"].render(**prompt_fields(turns, answers, None, 2))
    assert all(s in general for s in ("Q-ONE", "A-ONE", "Q-TWO", "A-TWO")) and "R-ONE" not in general
    # braces inside answers are data, not placeholders
    assert "{x}" in prompts["single-v1"].render(**prompt_fields(("q",), ["f'{x}'"], None, 1))
    for prompt in prompts.values():
        assert "[[rating]]" in prompt.system_prompt + prompt.prompt_template


def test_incomplete_prompt_file_is_refused(tmp_path, shared_data):
    lines = (shared_data / "mt_bench" / "judge_prompts.jsonl").read_text().splitlines()
    path = tmp_path / "judge_prompts.jsonl"
    path.write_text("\n".join(line for line in lines if '"single-math-v1"' not in line) + "\n")
    with pytest.raises(StageError, match=r"lacks the single-grading prompts \['single-math-v1'\]"):
        load_prompt_file(path)


def test_pairwise_prompts_fastchat_and_ours_have_the_same_placeholders(shared_data):
    path = shared_data / "mt_bench" / "judge_prompts.jsonl"
    theirs = load_prompts(str(path), "pairwise")
    ours = load_prompts(None, "pairwise")
    assert set(theirs) == set(ours) == set(PAIR_NAMES)
    for name in PAIR_NAMES:
        assert _placeholders(theirs[name].prompt_template) == _placeholders(ours[name].prompt_template)
        assert theirs[name].output_format == ours[name].output_format == "[[A]]"
        assert '"[[C]]" for a tie' in ours[name].system_prompt
    assert set(load_prompts(str(path), "both")) == set(PAIR_NAMES) | set(BUILTIN_PROMPTS)
    assert prompt_name("math", 1, True, pairwise=True) == "pair-math-v1"
    assert prompt_name("writing", 2, True, pairwise=True) == "pair-v2-multi-turn"
    assert prompt_name("coding", 2, False, pairwise=True) == "pair-v2-multi-turn"


@pytest.mark.parametrize("source", ["builtin", "fastchat"])
def test_pairwise_prompts_show_both_answers_in_their_places(source, shared_data):
    path = None if source == "builtin" else str(shared_data / "mt_bench" / "judge_prompts.jsonl")
    prompts = load_prompts(path, "pairwise")
    turns, ref = ("Q-ONE", "Q-TWO"), ("R-ONE", "R-TWO")
    first = prompts["pair-math-v1"].render(**pair_fields(turns, ["A1", "A2"], ["B1", "B2"], ref, 1))
    assert first.index("Q-ONE") < first.index("R-ONE") < first.index("A1") < first.index("B1")
    assert "A2" not in first and "Q-TWO" not in first
    second = prompts["pair-math-v1-multi-turn"].render(
        **pair_fields(turns, ["A1", "A2"], ["B1", "B2"], ref, 2)
    )
    assert (
        second.index("R-TWO")
        < second.index("A1")
        < second.index("A2")
        < second.index("B1")
        < second.index("B2")
    )


def test_incomplete_pairwise_prompt_file_is_refused(tmp_path, shared_data):
    lines = (shared_data / "mt_bench" / "judge_prompts.jsonl").read_text().splitlines()
    path = tmp_path / "judge_prompts.jsonl"
    path.write_text("\n".join(line for line in lines if '"pair-v2-multi-turn"' not in line) + "\n")
    assert set(load_prompts(str(path), "single")) == set(BUILTIN_PROMPTS)  # single grading needs no pairs
    with pytest.raises(StageError, match=r"lacks the pairwise prompts \['pair-v2-multi-turn'\]"):
        load_prompts(str(path), "both")
