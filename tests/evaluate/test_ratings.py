"""The rating parser: [[x]] first, [x] as a guarded fallback, last match wins, 1-10 only."""

from __future__ import annotations

import pytest

from pipeline.eval.judging import parse_rating, parse_winner


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is fine. Rating: [[5]]", 5.0),
        ("Rating: [[8.5]]", 8.5),
        ("[[ 7 ]]", 7.0),
        ("Rating: [[7/10]]", 7.0),
        ("Rating: [[10]]", 10.0),
        ("Rating: [[1]]", 1.0),
        ("Rating: [[6.]]", 6.0),
        # the format quoted from the instructions first, the verdict last: the verdict counts
        ('I must rate "[[rating]]", e.g. "Rating: [[5]]". Overall it is weak. Rating: [[3]]', 3.0),
        ("[[2]] at first glance, but on reflection [[4]]", 4.0),
        # single brackets: only as a verdict, never as a citation
        ("Rating: [6]", 6.0),
        ("Score: [9].", 9.0),
        ("Good answer overall [8]", 8.0),
        ("As shown in [1], the answer misses the point and is incomplete.", None),
        ("See [2] and [3] for details; the assistant did well.", None),
        # no valid rating: a failure, never a score
        ("Rating: [[rating]]", None),
        ("Rating: [[11]]", None),
        ("Rating: [[0]]", None),
        ("Rating: [[-3]]", None),
        ("I would give it an 8 out of 10.", None),
        ("Rating: 8", None),
        ("", None),
        ("[[]]", None),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Assistant A is better. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Both are equally good: [[C]]", "tie"),
        ('Format: "[[A]]" if A is better... My verdict: [[B]]', "B"),  # the last one counts
        ("[[A]] (p A 0.612, B 0.301, C 0.087)", "A"),  # the local judge's probability note
        ("A is better", None),
        ("[A]", None),
        ("[[D]]", None),
        ("", None),
    ],
)
def test_pairwise_verdict_parser(text, expected):
    assert parse_winner(text) == expected
