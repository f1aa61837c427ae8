"""Plotly figures shared by the pages and the exported report (no Streamlit here).

Plotly reads a subset of HTML in every label, legend and hover text (``<a href>`` becomes a
live link, ``<img>``-like tags and entities are interpreted): user text (class names, file
names, catalog values) goes into a figure only through :func:`escape`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

PALETTE = ["#2F6FEB", "#E8663D", "#2BA84A", "#9B59B6", "#F1C40F", "#16A085", "#C0392B", "#7F8C8D"]
# Legends sit in one row under the chart: at the top right, where Plotly puts them, the
# chart's toolbar (zoom, download...) covers their first entries.
LEGEND_BELOW = dict(orientation="h", x=0, xanchor="left", y=-0.04, yanchor="top", title_text="")


def escape(text: object) -> str:
    """User text as Plotly shows it literally: ``<``, ``>`` and ``&`` become entities (which
    Plotly turns back into the characters), so no tag or link inside a label comes alive."""
    return html.escape(str(text), quote=False)


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], *, names: Mapping[str, str] | None = None,
                     title: str = "") -> go.Figure:
    """Counts of true (rows) vs predicted (columns) classes, with the share of each row."""
    names = names or {}
    labels = [escape(names.get(c, c)) for c in classes]
    cm = np.asarray(confusion, dtype=float)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    text = [[f"{int(cm[i, j])}<br>({100 * share[i, j]:.0f} %)" for j in range(len(classes))] for i in range(len(classes))]
    fig = go.Figure(go.Heatmap(
        z=share, x=labels, y=labels, text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
        showscale=False, hovertemplate="True: %{y}<br>Predicted: %{x}<br>%{text}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="Predicted", yaxis_title="True label", yaxis_autorange="reversed",
                      xaxis_type="category", yaxis_type="category",
                      height=300 + 30 * len(classes), margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    return fig


def curves_figure(report: Mapping, *, kind: str = "roc") -> go.Figure | None:
    """ROC or precision-recall curve of a binary report (``EvalReport.to_dict()``)."""
    data = report.get("roc" if kind == "roc" else "pr")
    if not data:
        return None
    if kind == "roc":
        x, y, xt, yt = data["fpr"], data["tpr"], "Wrongly tagged (false positive rate)", "Found (recall)"
        name = f"AUC {report.get('roc_auc') or 0:.3f}"
    else:
        x, y, xt, yt = data["recall"], data["precision"], "Found (recall)", "Right when tagged (precision)"
        name = f"AP {report.get('average_precision') or 0:.3f}"
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", name=name, line=dict(color=PALETTE[0], width=3)))
    fig.update_layout(xaxis_title=xt, yaxis_title=yt, height=320, margin=dict(l=10, r=10, t=30, b=10),
                      title=name, xaxis_range=[0, 1], yaxis_range=[0, 1.02])
    return fig


def reliability_figure(reliability: Mapping) -> go.Figure | None:
    """Stated confidence vs how often the label given was right, before and after calibration
    (``{"before": ..., "after": ...}`` of :func:`core.learning.calibration.reliability`)."""
    series = [(k, reliability.get(k)) for k in ("before", "after") if reliability.get(k) and reliability[k]["bins"]]
    if not series:
        return None
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="Perfectly honest",
                               line=dict(color="#7F8C8D", dash="dot")))
    names = {"before": "As the model first said", "after": "After adjusting its confidence"}
    for i, (key, rel) in enumerate(series):
        bins = rel["bins"]
        fig.add_trace(go.Scatter(
            x=[b["confidence"] for b in bins], y=[b["right"] for b in bins], mode="lines+markers",
            name=f"{names[key]} (off by {100 * rel['ece']:.1f} points)", line=dict(color=PALETTE[i], width=3),
            marker=dict(size=[6 + 14 * (b["n"] / max(1, rel["n"])) ** 0.5 for b in bins]),
            text=[f"{b['n']} photos" for b in bins],
            hovertemplate="Said %{x:.0%} sure, right %{y:.0%} of the time (%{text})<extra></extra>",
        ))
    fig.update_layout(xaxis_title="How sure the model said it was", yaxis_title="How often it was right",
                      xaxis_tickformat=".0%", yaxis_tickformat=".0%", xaxis_range=[0, 1.02], yaxis_range=[0, 1.02],
                      height=340, margin=dict(l=10, r=10, t=10, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.22, x=0))
    return fig


def history_figure(history: Sequence[Mapping]) -> go.Figure:
    """Training and validation loss per round (pass over the training photos, counted from 1) of a fine-tuning run."""
    fig = go.Figure()
    rounds = [h["epoch"] + 1 for h in history]
    for key, label, colour in (("train_loss", "Training loss", PALETTE[0]), ("val_loss", "Validation loss", PALETTE[1])):
        fig.add_trace(go.Scatter(x=rounds, y=[h.get(key) for h in history], name=label, mode="lines+markers",
                                 line=dict(color=colour)))
    fig.update_layout(xaxis_title="Round", yaxis_title="Loss", height=300, margin=dict(l=10, r=10, t=10, b=10),
                      legend={**LEGEND_BELOW, "y": -0.25})
    return fig


def share_figure(counts: Mapping[str, int], *, title: str = "", horizontal: bool = False) -> go.Figure:
    """A bar per class with its count and share (``horizontal``: compact, for summaries)."""
    total = max(sum(counts.values()), 1)
    keys = [escape(k) for k in counts]
    values = list(counts.values())
    text = [f"{n:,} ({100 * n / total:.0f} %)" for n in values]
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(keys))]
    if horizontal:
        fig = go.Figure(go.Bar(y=keys, x=values, orientation="h", marker_color=colours, text=text,
                               textposition="outside", cliponaxis=False))
        fig.update_layout(title=title, height=70 + 42 * len(keys), yaxis=dict(type="category", autorange="reversed"),
                          xaxis=dict(visible=False, range=[0, 1.25 * max(values, default=1)]),
                          margin=dict(l=10, r=10, t=40 if title else 10, b=10))
        return fig
    fig = go.Figure(go.Bar(x=keys, y=values, marker_color=colours, text=text, textposition="auto"))
    fig.update_layout(title=title, height=320, margin=dict(l=10, r=10, t=40 if title else 10, b=10), yaxis_title="Photos",
                      xaxis_type="category")
    return fig


def map_figure(xy: np.ndarray, colour: Sequence[str], hover: Sequence[str], *, title: str = "") -> go.Figure:
    """A 2-D map of the photos, one colour per group; ``hover`` is Plotly text (user text in it
    passed through :func:`escape`).

    No drag tool is set: a page that lets people pick photos (Streamlit's ``on_select``) then
    pans on drag and selects the point clicked, and the lasso is one click away in the
    toolbar. With the lasso as the starting tool, Plotly turns a click into a hover only.
    """
    fig = go.Figure()
    groups = list(dict.fromkeys(colour))
    colour = np.asarray(colour)
    for i, group in enumerate(groups):
        mask = colour == group
        idx = np.flatnonzero(mask)
        fig.add_trace(go.Scattergl(
            x=xy[mask, 0], y=xy[mask, 1], mode="markers", name=escape(group), customdata=idx,
            text=[hover[j] for j in idx], hovertemplate="%{text}<extra></extra>",
            marker=dict(size=8, color=PALETTE[i % len(PALETTE)], line=dict(width=0.5, color="white")),
        ))
    fig.update_layout(title=title, height=560, margin=dict(l=10, r=10, t=40 if title else 10, b=10),
                      xaxis=dict(visible=False), yaxis=dict(visible=False), legend=LEGEND_BELOW)
    return fig


def grouped_share_figure(table, *, title: str = "") -> go.Figure:
    """Share of each tag within each group (rows: groups, columns: tags, cells: counts)."""
    shares = table.div(table.sum(axis=1).where(lambda s: s > 0, 1), axis=0)
    fig = go.Figure()
    for i, tag in enumerate(table.columns):
        fig.add_trace(go.Bar(
            x=[escape(g) for g in table.index], y=shares[tag], name=escape(tag), marker_color=PALETTE[i % len(PALETTE)],
            text=[f"{int(n)}" for n in table[tag]], textposition="inside",
            hovertemplate="%{x}: %{y:.0%} (%{text} rows)<extra>%{fullData.name}</extra>",
        ))
    fig.update_layout(barmode="stack", title=title, height=360, yaxis_tickformat=".0%", xaxis_type="category",
                      margin=dict(l=10, r=10, t=40 if title else 10, b=10), yaxis_title="Share of rows",
                      legend={**LEGEND_BELOW, "y": -0.12, "traceorder": "normal"})
    return fig
