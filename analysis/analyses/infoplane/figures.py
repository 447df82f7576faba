"""The information plane: one trajectory per layer over training."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...result import Result


def info_plane(table: pd.DataFrame, estimator: str = "renyi") -> go.Figure:
    """I(X; T) against I(T; Y): one trajectory per layer through the checkpoints in the order given, markers
    coloured by their place in the series."""
    sub = table[table["estimator"] == estimator]
    order = {c: i for i, c in enumerate(dict.fromkeys(sub["checkpoint"]))}
    traces = []
    for layer, g in sub.groupby("layer"):
        g = g.assign(order=g["checkpoint"].map(order)).sort_values("order")
        traces.append(go.Scatter(
            x=g["i_xt"], y=g["i_ty"], mode="lines+markers", name=f"layer {layer}", line=dict(width=1),
            marker=dict(size=9, color=g["order"], colorscale="Viridis", showscale=bool(layer == sub["layer"].min()),
                        cmin=0, cmax=max(1, len(order) - 1),
                        colorbar=dict(title="checkpoint", x=1.12, tickvals=list(order.values()),
                                      ticktext=list(order))),
            customdata=g[["checkpoint", "entropy"]].to_numpy(),
            hovertemplate=f"layer {layer}<br>%{{customdata[0]}}<br>I(X;T) %{{x:.3f}} bits<br>"
                          "I(T;Y) %{y:.3f} bits<br>S(T) %{customdata[1]:.3f} bits<extra></extra>"))
    name = {"renyi": "matrix-based Rényi", "dse": "diffusion spectral"}[estimator]
    return go.Figure(traces, layout=dict(title=f"Information plane ({name} estimates)", height=480, margin=_MARGIN,
                                         xaxis_title="I(X; T) bits", yaxis_title="I(T; Y) bits"))


def figures(result: Result, estimator: str = "renyi") -> dict[str, go.Figure]:
    return {"plane": info_plane(result.table, estimator)}
