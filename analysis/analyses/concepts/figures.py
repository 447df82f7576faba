"""Probe figures: held-out accuracy by layer with the control task."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...result import Result


def probe_accuracy(table: pd.DataFrame) -> go.Figure:
    """Held-out probe accuracy by layer per concept (solid), the control task (dotted) and chance (grey)."""
    traces = []
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (concept, g) in enumerate(table.groupby("concept", sort=False)):
        c = palette[i % len(palette)]
        g = g.sort_values("layer")
        if "accuracy_low" in g:  # the 95% bootstrap interval over held-out texts
            traces.append(go.Scatter(x=[*g["layer"], *g["layer"][::-1]], y=[*g["accuracy_high"],
                                                                               *g["accuracy_low"][::-1]],
                                     fill="toself", line=dict(width=0), fillcolor=c, opacity=0.15,
                                     legendgroup=concept, showlegend=False, hoverinfo="skip"))
        traces.append(go.Scatter(x=g["layer"], y=g["accuracy"], mode="lines+markers", name=concept,
                                 line=dict(color=c), legendgroup=concept,
                                 customdata=g[["control_accuracy", "selectivity"]].to_numpy(),
                                 hovertemplate=f"{concept}<br>layer %{{x}}<br>accuracy %{{y:.3f}}<br>control "
                                               "%{customdata[0]:.3f}<br>selectivity %{customdata[1]:.3f}"
                                               "<extra></extra>"))
        traces.append(go.Scatter(x=g["layer"], y=g["control_accuracy"], mode="lines", name=f"{concept} control",
                                 line=dict(color=c, dash="dot"), legendgroup=concept, showlegend=False,
                                 hovertemplate=f"{concept} control task<br>layer %{{x}}<br>%{{y:.3f}}<extra></extra>"))
    return go.Figure(traces, layout=dict(title="Probe accuracy by layer (band: 95% interval over held-out texts; "
                                               "dotted: control task, shuffled labels)",
                                         height=420, margin=_MARGIN, xaxis_title="layer (-1: embedding)",
                                         yaxis=dict(title="held-out accuracy", range=[0, 1.02])))


def figures(result: Result) -> dict[str, go.Figure]:
    return {"accuracy": probe_accuracy(result.table)}
