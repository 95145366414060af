"""The train stage's loss figure: readable when sources differ in scale, legends clear of the curves."""

from __future__ import annotations

import pytest

from pipeline.stages.train_worker import loss_figure

TRAIN = [{"loss": 1.7, "step": 1}, {"loss": 1.5, "step": 5}, {"loss": 1.6, "step": 10}]


def _legend_below(fig, ax) -> bool:
    renderer = fig.canvas.get_renderer()
    return ax.get_legend().get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0


def test_sources_of_different_scale_get_a_relative_panel(tmp_path):
    history = [*TRAIN,
               {"eval_string_loss": 4.4, "step": 0}, {"eval_list_loss": 1.2, "step": 0},
               {"eval_string_loss": 4.29, "step": 10}, {"eval_list_loss": 0.9, "step": 10}]  # fmt: skip
    fig = loss_figure(history)
    left, right = fig.axes
    curves = {line.get_label(): list(line.get_ydata()) for line in right.get_lines()[:-1]}  # last: y = 1
    assert curves == {"list: 1.20 → 0.90": [1.0, pytest.approx(0.75)],
                      "string: 4.40 → 4.29": [1.0, pytest.approx(4.29 / 4.4)]}  # fmt: skip
    mean = next(line for line in left.get_lines() if line.get_label() == "held-out loss (mean of sources)")
    assert list(mean.get_xdata()) == [0, 10] and list(mean.get_ydata()) == pytest.approx([2.8, 2.595])
    assert right.get_lines()[0].get_marker() == "o"  # two evaluations: points, not just a line
    assert _legend_below(fig, left) and _legend_below(fig, right)
    fig.savefig(tmp_path / "loss.png", bbox_inches="tight")  # as the worker saves it
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_one_eval_set_shares_the_train_panel():
    fig = loss_figure([*TRAIN, {"eval_loss": 2.0, "step": 0}, {"eval_loss": 1.8, "step": 10}])
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["train loss", "held-out loss"]
    assert _legend_below(fig, ax)
    assert loss_figure([{"learning_rate": 0.1, "step": 1}]) is None
