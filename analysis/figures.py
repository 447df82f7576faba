"""Plotly figures built from stored results: the same figures on a page, in an HTML report and in benchmarks.

Built with plotly.graph_objects and the layout passed to the constructor: plotly.express takes ~40 ms a figure
here, which would be most of the 200 ms budget for reopening a stored view.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .store import Result

_MARGIN = dict(l=0, r=0, t=40, b=0)


def token_labels(tokens: pd.DataFrame) -> list[str]:
    """Unique axis labels for token positions: "3:' John'"."""
    return [f"{p}:{t!r}" for p, t in zip(tokens["pos"], tokens["token"])]


def predictions_bar(preds: pd.DataFrame) -> go.Figure:
    rev = preds.iloc[::-1]
    labels = [f"{r}. {t!r}" for r, t in zip(rev["rank"], rev["token"])]
    bar = go.Bar(x=rev["prob"].to_numpy(), y=labels, orientation="h", customdata=rev[["logit", "token_id"]].to_numpy(),
                 hovertemplate="%{y}<br>probability %{x:.4f}<br>logit %{customdata[0]:.3f}<br>"
                               "token id %{customdata[1]}<extra></extra>")
    return go.Figure(bar, layout=dict(title="Next-token predictions", height=max(250, 26 * len(preds)),
                                      margin=_MARGIN, xaxis_title="probability"))


def attention_heatmap(att: pd.DataFrame, tokens: pd.DataFrame, layer: int, head: int) -> go.Figure:
    sub = att[(att["layer"] == layer) & (att["head"] == head)]
    n = len(tokens)
    grid = np.full((n, n), np.nan)  # [query_pos, key_pos]; above the diagonal stays empty (causal)
    grid[sub["query_pos"].to_numpy(), sub["key_pos"].to_numpy()] = sub["weight"].to_numpy()
    labels = token_labels(tokens)
    heat = go.Heatmap(z=grid, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, colorbar_title="weight",
                      hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>")
    return go.Figure(heat, layout=dict(
        title=f"Attention pattern, layer {layer} head {head}", height=max(320, 22 * n), margin=_MARGIN,
        xaxis=dict(title="key", tickangle=-60), yaxis=dict(title="query", autorange="reversed")))


def model_view_figures(result: Result, layer: int = 0, head: int = 0) -> dict[str, go.Figure]:
    return {
        "predictions": predictions_bar(result.table),
        "attention": attention_heatmap(result.extra["attention"], result.extra["tokens"], layer, head),
    }


FIGURES = {"model": model_view_figures}
