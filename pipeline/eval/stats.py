"""How sure is a score? Seeded 95% percentile-bootstrap intervals of the mean, resampling questions (a
conversation's turns are not independent); paired comparisons resample the *same* questions for both."""

from __future__ import annotations

from typing import Any

import numpy as np

RESAMPLES = 10_000
SEED = 0
MIN_QUESTIONS = 6  # fewer: no interval (a two-sided sign test needs 6 questions to reach p < 0.05)
Units = dict[str, list[float | None]]  # question key -> per-turn values (None: none)


def resample_indices(n: int, seed: int = SEED, resamples: int = RESAMPLES) -> np.ndarray:
    """``resamples`` rows of ``n`` question indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _means(rows: list[list[float]], indices: np.ndarray) -> np.ndarray:
    """The mean over every value of the questions ``indices`` picks, per row of ``indices``."""
    sums, counts = (np.array([f(row) for row in rows], dtype=float) for f in (sum, len))
    with np.errstate(invalid="ignore"):  # a resample of questions without values: nan, skipped
        return sums[indices].sum(axis=1) / counts[indices].sum(axis=1)


def _bounds(statistics: np.ndarray) -> list[float]:
    low, high = np.nanpercentile(statistics, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def _rows(units: Units) -> list[list[float]]:
    """The questions' present values, for the questions that have any."""
    return [row for values in units.values() if (row := [v for v in values if v is not None])]


def interval(units: Units, seed: int = SEED) -> list[float] | None:
    """95% interval of the mean over every value, resampling questions; None for too few questions."""
    rows = _rows(units)
    return None if len(rows) < MIN_QUESTIONS else _bounds(_means(rows, resample_indices(len(rows), seed)))


def verdict(ci95: list[float]) -> str:
    return "better" if ci95[0] > 0 else "worse" if ci95[1] < 0 else "no detectable difference"


def compare(reference: Units, candidate: Units, seed: int = SEED, paired: bool = True,
            ) -> dict[str, Any] | None:  # fmt: skip
    """``candidate - reference`` with a 95% interval (None: too few questions). Paired: over the
    questions and turns both have, one resample for both; unpaired: each side resampled on its own."""
    if paired:
        pairs = [[(r, c) for r, c in zip(reference[key], candidate[key], strict=False) if None not in (r, c)]
                 for key in candidate if key in reference]  # fmt: skip
        ref, cand = ([[pair[side] for pair in p] for p in pairs if p] for side in (0, 1))
    else:
        ref, cand = _rows(reference), _rows(candidate)
    if min(len(ref), len(cand)) < MIN_QUESTIONS:
        return None
    ref_indices = resample_indices(len(ref), seed)
    cand_indices = ref_indices if paired else resample_indices(len(cand), seed + 1)
    ci95 = _bounds(_means(cand, cand_indices) - _means(ref, ref_indices))
    diff = _means(cand, np.arange(len(cand))[None])[0] - _means(ref, np.arange(len(ref))[None])[0]
    return {"diff": round(float(diff), 4), "ci95": ci95, "n": len(cand), "verdict": verdict(ci95)}
