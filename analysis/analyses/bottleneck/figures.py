"""Concept-bottleneck figures: the head's weights and each head's accuracy."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...result import Result


def bottleneck_weights(table: pd.DataFrame) -> go.Figure:
    """The head's weight per concept score (rows) and behaviour class (columns)."""
    grid = table.pivot(index="feature", columns="behaviour", values="weight")
    z = grid.to_numpy()
    lim = float(np.abs(z).max()) or 1.0
    heat = go.Heatmap(z=z, x=list(grid.columns), y=list(grid.index), colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
                      colorbar=dict(title="weight"),
                      hovertemplate="%{y}<br>→ %{x}<br>weight %{z:.3f}<extra></extra>")
    return go.Figure(heat, layout=dict(title="Bottleneck weights (standardised concept scores; 0 = pruned)",
                                       height=max(260, 40 * len(grid) + 120), margin=_MARGIN))


def bottleneck_summary(summary: pd.DataFrame) -> go.Figure:
    bar = go.Bar(x=summary["accuracy"], y=summary["head"], orientation="h",
                 customdata=summary[["completeness", "features"]].to_numpy(),
                 hovertemplate="%{y}<br>accuracy %{x:.3f}<br>completeness %{customdata[0]:.3f}<br>"
                               "%{customdata[1]} features<extra></extra>")
    return go.Figure(bar, layout=dict(title="Held-out accuracy of each head", height=280, margin=_MARGIN,
                                      xaxis=dict(title="accuracy", range=[0, 1.02])))


def figures(result: Result) -> dict[str, go.Figure]:
    return {"weights": bottleneck_weights(result.table), "heads": bottleneck_summary(result.extra["summary"])}
