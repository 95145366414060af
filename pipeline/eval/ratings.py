"""Reading the judge's verdict: the ``[[rating]]`` (or pairwise ``[[A]]``) it was told to write, or
nothing. A judgment without one is recorded as a failure, never turned into a score: a guess would
bias the averages toward whatever the guess favours."""

from __future__ import annotations

import re

MIN_RATING, MAX_RATING = 1.0, 10.0
_NUMBER = r"\s*(\d+(?:\.\d+)?|\d+\.)\s*(?:/\s*10\s*)?"
_DOUBLE, _SINGLE = re.compile(r"\[\[" + _NUMBER + r"\]\]"), re.compile(r"\[" + _NUMBER + r"\]")
# A lone "[7]" is accepted only where it is plainly the verdict, not a citation like "see [1]".
_VERDICT_WORD = re.compile(r"(rating|score|grade|verdict)\W{0,12}$", re.IGNORECASE)
_WINNER = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(text: str) -> float | None:
    """The rating in a judge's output, or ``None`` when there is no valid one.

    Like FastChat, ``[[x]]`` first and ``[x]`` as fallback; unlike FastChat, the *last* match
    wins (judges often quote the format, "e.g. Rating: [[5]]", before giving theirs), ``x/10`` is
    read as ``x``, a single-bracket rating counts only after "rating"/"score" or at the very end,
    and ratings outside 1-10 are rejected.
    """
    if not text:
        return None
    matches = list(_DOUBLE.finditer(text)) or [
        m for m in _SINGLE.finditer(text)
        if _VERDICT_WORD.search(text[max(0, m.start() - 40) : m.start()]) or not text[m.end() :].strip(" .\n")
    ]  # fmt: skip
    value = float(matches[-1].group(1)) if matches else None
    return value if value is not None and MIN_RATING <= value <= MAX_RATING else None


def parse_winner(text: str) -> str | None:
    """A pairwise verdict: ``"A"``, ``"B"`` or ``"tie"`` (``[[C]]``) from the last ``[[A]]``/``[[B]]``/
    ``[[C]]`` in the output (FastChat's format; the last one, as for ratings), else None."""
    matches = _WINNER.findall(text or "")
    return None if not matches else {"A": "A", "B": "B", "C": "tie"}[matches[-1]]
