"""The per-category picture: one radar chart with every evaluated model overlaid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def radar_chart(
    models: dict[str, dict[str, Any]], path: Path, title: str = "MT-Bench score by category"
) -> Path:
    """Write a radar chart (one axis per category, 0-10, one polygon per model) as PNG.

    Categories a model has no score for are drawn at 0 and marked in the legend, so a gap is visible
    instead of silently closing the polygon.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({cat for row in models.values() for cat in row["categories"]})
    if not categories:
        raise ValueError("radar chart: no categories to draw")
    angles = [2 * math.pi * i / len(categories) for i in range(len(categories))]
    figure = plt.figure(figsize=(6, 6))
    axes = figure.add_subplot(polar=True)
    for name, row in models.items():
        values = [row["categories"].get(cat) for cat in categories]
        missing = sum(v is None for v in values)
        points = [0.0 if v is None else float(v) for v in values]
        label = name + (f" ({missing} categories unscored)" if missing else "")
        overall = row.get("score_overall")
        if overall is not None:
            label += f" — overall {overall:.2f}"
        axes.plot([*angles, angles[0]], [*points, points[0]], linewidth=2, label=label)
        axes.fill([*angles, angles[0]], [*points, points[0]], alpha=0.15)
    axes.set_xticks(angles)
    axes.set_xticklabels(categories)
    axes.set_ylim(0, 10)
    axes.set_yticks([2, 4, 6, 8, 10])
    axes.set_title(title, pad=20)
    axes.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
