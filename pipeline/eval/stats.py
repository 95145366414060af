"""How sure is a score? Seeded 95% percentile-bootstrap intervals of the mean, resampling questions
(two answers in one conversation are not independent); paired comparisons resample the *same*
questions for both models, so question difficulty cancels out. ``Units``: question key -> per-turn
values (``None``: no value). Below ``MIN_QUESTIONS`` there is no interval: a two-sided sign test
needs 6 questions to reach p < 0.05."""

from __future__ import annotations

from typing import Any

import numpy as np

RESAMPLES = 10_000
SEED = 0
MIN_QUESTIONS = 6
Units = dict[str, list[float | None]]


def resample_indices(n: int, seed: int = SEED, resamples: int = RESAMPLES) -> np.ndarray:
    """``resamples`` rows of ``n`` question indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _sums(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([sum(r) for r in rows], dtype=float), np.array([len(r) for r in rows], dtype=float)


def _means(sums: np.ndarray, counts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # a resample of questions without values: nan, skipped
        return sums[indices].sum(axis=1) / counts[indices].sum(axis=1)


def _bounds(statistics: np.ndarray) -> list[float]:
    low, high = np.nanpercentile(statistics, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def _rows(units: Units) -> list[list[float]]:
    """The questions' present values, for the questions that have any."""
    rows = [[v for v in values if v is not None] for values in units.values()]
    return [row for row in rows if row]


def interval(units: Units, seed: int = SEED) -> list[float] | None:
    """95% interval of the mean over every value, resampling questions; None for too few questions."""
    rows = _rows(units)
    if len(rows) < MIN_QUESTIONS:
        return None
    sums, counts = _sums(rows)
    return _bounds(_means(sums, counts, resample_indices(len(rows), seed)))


def verdict(ci95: list[float]) -> str:
    return "better" if ci95[0] > 0 else "worse" if ci95[1] < 0 else "no detectable difference"


def compare(reference: Units, candidate: Units, seed: int = SEED, paired: bool = True,
            ) -> dict[str, Any] | None:  # fmt: skip
    """``candidate - reference`` with a 95% interval (None: too few questions). Paired: over the
    questions and turns both have, one resample for both; unpaired: each side resampled on its own."""
    if paired:
        pairs = [[(r, c) for r, c in zip(reference[key], candidate[key], strict=False) if None not in (r, c)]
                 for key in candidate if key in reference]  # fmt: skip
        pairs = [p for p in pairs if p]
        sides = [[r for r, _ in p] for p in pairs], [[c for _, c in p] for p in pairs]
    else:
        sides = _rows(reference), _rows(candidate)
    if min(map(len, sides)) < MIN_QUESTIONS:
        return None
    (ref_sums, ref_counts), (cand_sums, cand_counts) = map(_sums, sides)
    ref_indices = resample_indices(len(sides[0]), seed)
    cand_indices = ref_indices if paired else resample_indices(len(sides[1]), seed + 1)
    diffs = _means(cand_sums, cand_counts, cand_indices) - _means(ref_sums, ref_counts, ref_indices)
    diff = cand_sums.sum() / cand_counts.sum() - ref_sums.sum() / ref_counts.sum()
    ci95 = _bounds(diffs)
    return {"diff": round(float(diff), 4), "ci95": ci95, "n": len(sides[1]), "verdict": verdict(ci95)}
