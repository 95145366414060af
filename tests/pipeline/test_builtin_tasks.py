"""The built-in task generator: deterministic, prefix-stable, verifiable answers."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from pipeline.builtin_tasks import CATEGORIES, generate_tasks


def test_deterministic_and_prefix_stable():
    a = generate_tasks(60, seed=3)
    assert a == generate_tasks(60, seed=3)
    assert generate_tasks(25, seed=3) == a[:25]
    assert a != generate_tasks(60, seed=4)


def test_schema_and_categories_balanced():
    tasks = generate_tasks(120, seed=0)
    assert {t["category"] for t in tasks} == set(CATEGORIES) and len(CATEGORIES) >= 6
    for task in tasks:
        assert set(task) == {"category", "instruction", "output", "answer"}
        assert task["instruction"] and task["answer"]
        # the worked output ends with the exact answer
        assert task["output"].splitlines()[-1] == f"Answer: {task['answer']}"
    counts = {c: sum(t["category"] == c for t in tasks) for c in CATEGORIES}
    assert set(counts.values()) == {120 // len(CATEGORIES)}


def test_answers_are_correct():
    """Re-derive each answer independently from the instruction text."""
    checked = 0
    for task in generate_tasks(600, seed=11):
        q, ans = task["instruction"], task["answer"]
        if m := re.match(r"What date is (\d+) days after (\d{4}-\d\d-\d\d)\?", q):
            expected = dt.date.fromisoformat(m[2]) + dt.timedelta(days=int(m[1]))
            assert ans == expected.isoformat()
        elif m := re.match(r"How many days are there from (\S+) to (\S+)\?", q):
            assert int(ans) == (dt.date.fromisoformat(m[2]) - dt.date.fromisoformat(m[1])).days
        elif m := re.match(r"Sort these numbers in ascending order: (.*)", q):
            assert ans == ", ".join(map(str, sorted(int(x) for x in m[1].split(", "))))
        elif m := re.match(r"What is the sum of (.*)\?", q):
            assert int(ans) == sum(int(x) for x in m[1].split(", "))
        elif m := re.match(r"Reverse the characters of the text '([\w ]+)'", q):
            assert ans == m[1][::-1]
        elif m := re.match(r"Remove every vowel \(a, e, i, o, u\) from the text '([\w ]+)'", q):
            assert ans == re.sub("[aeiou]", "", m[1])
        elif m := re.match(r"Convert (\d+) (\w+) to (\w+)\.", q):
            from pipeline.builtin_tasks import _UNITS

            factors = {(a, b): f for a, b, f in _UNITS}
            assert int(ans) == int(m[1]) * factors[(m[2], m[3])]
        elif m := re.match(r"(\w+) has (\d+) (\w+) and buys (\d+) packs with (\d+)", q):
            assert int(ans) == int(m[2]) + int(m[4]) * int(m[5])
        elif q.startswith("Write a JSON object"):
            parsed = json.loads(ans)
            assert list(parsed) == ["age", "city", "name"]
            assert f"age is {parsed['age']}" in q and f"name is {parsed['name']}" in q
        else:
            continue
        checked += 1
    assert checked > 250


def test_few_duplicates():
    """The CPU default draws 1,500 tasks; nearly all must be distinct so dedupe keeps them."""
    tasks = generate_tasks(1500, seed=42)
    assert len({(t["instruction"], t["output"]) for t in tasks}) >= 1480


def test_negative_n_rejected():
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_tasks(-1, seed=0)
    assert generate_tasks(0, seed=0) == []
