"""TCAV scores per layer against random concepts."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...result import Result


def tcav_scores(table: pd.DataFrame, draws: pd.DataFrame, name: str = "") -> go.Figure:
    traces = []
    for kind, colour in (("concept", "#1f77b4"), ("random", "#7f7f7f")):
        d = draws[draws["set"] == kind]
        traces.append(go.Box(x=d["layer"], y=d["tcav"], name=name if kind == "concept" and name else kind,
                             marker_color=colour, boxpoints="all", jitter=0.3,
                             hovertemplate="layer %{x}<br>TCAV %{y:.3f}<extra></extra>"))
    stars = table[table["significant"]]
    traces.append(go.Scatter(x=stars["layer"], y=[1.05] * len(stars), mode="text", text=["*"] * len(stars),
                             name="p < 0.05 (Bonferroni)", textfont=dict(size=20)))
    return go.Figure(traces, layout=dict(title="TCAV scores per layer against random concepts", boxmode="group",
                                         height=420, margin=_MARGIN, xaxis_title="layer (-1: embedding)",
                                         yaxis=dict(title="fraction of inputs with a positive derivative",
                                                    range=[0, 1.1])))


def figures(result: Result) -> dict[str, go.Figure]:
    m = result.meta
    return {"tcav": tcav_scores(result.table, result.extra["draws"], f"{m.get('concept')}={m.get('value')}")}
