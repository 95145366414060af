"""The pictures: per-category scores (radar, with 95% intervals as radial error bars) and the
paired tuned-base differences with their intervals (one row per metric, zero marked)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt


def radar_chart(models: dict[str, dict[str, Any]], path: Path) -> Path:
    """Radar PNG (an axis per category, 0-10, a polygon per model); unscored categories at 0, counted in the
    legend; each model its own line style, marker size and shifted interval bars, so none hides another."""
    categories = sorted({cat for row in models.values() for cat in row["categories"]})
    angles = [2 * math.pi * i / len(categories) for i in range(len(categories))]
    figure, axes = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    for index, (name, row) in enumerate(models.items()):
        values = [row["categories"].get(cat) for cat in categories]
        missing, overall = sum(v is None for v in values), row.get("score_overall")
        label = name + (f" ({missing} categories unscored)" if missing else "")
        label += "" if overall is None else f" — overall {overall:.2f}"
        ring = [*angles, angles[0]], [0.0 if v is None else float(v) for v in [*values, values[0]]]
        (line,) = axes.plot(*ring, label=label, linestyle=("-", "--", ":", "-.")[index % 4], marker="o",
                            linewidth=3.5 - index, markersize=max(3.0, 9.0 - 2.5 * index), zorder=2 + index)
        axes.fill(*ring, alpha=0.1)
        shift = (index - (len(models) - 1) / 2) * 0.06  # radians: side by side, not on top
        for angle, interval in zip(angles, map(row.get("categories_ci95", {}).get, categories), strict=True):
            if interval:
                axes.plot([angle + shift] * 2, interval, color=line.get_color(), linewidth=3, alpha=0.5)
    axes.set_xticks(angles, categories)
    axes.set(ylim=(0, 10), yticks=[2, 4, 6, 8, 10])
    axes.set_title("MT-Bench score by category", pad=20)
    axes.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize="small")
    return _save(plt, figure, path)


def comparison_chart(comparisons: dict[str, dict[str, Any]], path: Path) -> Path:
    """Each metric's tuned - base difference on its paired 95% interval; scores (1-10) and rates apart."""
    rates = [n for n in comparisons if n.startswith(("exact_match", "pairwise"))][::-1]
    scores = [n for n in comparisons if n not in rates][::-1]
    panels = [names for names in (scores, rates) if names]
    heights = [len(names) for names in panels]
    figure, axes_list = plt.subplots(len(panels), 1, figsize=(7, 1.2 + 0.35 * sum(heights)),
                                     height_ratios=heights, squeeze=False)  # fmt: skip
    for axes, names in zip(axes_list[:, 0], panels, strict=True):
        for row, name in enumerate(names):
            c = comparisons[name]
            color = {"better": "tab:green", "worse": "tab:red"}.get(c["verdict"], "tab:gray")
            errors = [[max(0.0, c["diff"] - c["ci95"][0])], [max(0.0, c["ci95"][1] - c["diff"])]]
            axes.errorbar(c["diff"], row, xerr=errors, fmt="o", color=color, capsize=3)
        axes.axvline(0, color="black", linewidth=0.8)
        axes.set_yticks(range(len(names)), names)
    axes_list[-1, 0].set_xlabel("tuned − base (paired, 95% bootstrap interval)")
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
