"""The shared Plotly figures: legends clear of the chart toolbar, a map whose points take a click."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.present import charts


def test_legends_sit_under_the_charts_where_the_toolbar_cannot_cover_them():
    xy = np.random.default_rng(0).normal(size=(30, 2))
    figures = [
        charts.map_figure(xy, ["Model in shot"] * 15 + ["No model"] * 15, [""] * 30),
        charts.grouped_share_figure(pd.DataFrame({"yes": [3, 1], "could not be tagged": [1, 2]}, index=["A", "B"])),
        charts.history_figure([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1}, {"epoch": 2, "train_loss": 0.8}]),
    ]
    for fig in figures:
        legend = fig.layout.legend
        assert legend.orientation == "h" and legend.y < 0 and legend.yanchor == "top", fig.layout.legend


def test_the_map_starts_without_the_lasso_so_that_a_click_selects_a_photo():
    """With the lasso as the starting tool Plotly turns a click into a mere hover (the journey's
    browser test clicks a point and sees its photo)."""
    fig = charts.map_figure(np.zeros((40, 2)), ["a"] * 40, [""] * 40)
    assert fig.layout.dragmode is None and fig.layout.clickmode is None
