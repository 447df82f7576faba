"""The Model page's figures: next-token predictions and attention patterns."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...plots import token_labels
from ...result import Result


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


def figures(result: Result, layer: int = 0, head: int = 0) -> dict[str, go.Figure]:
    return {
        "predictions": predictions_bar(result.table),
        "attention": attention_heatmap(result.extra["attention"], result.extra["tokens"], layer, head),
    }
