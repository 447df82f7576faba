"""Quantization figures: measured damage, predicted against measured, and the allocation's Pareto frontier."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...result import Result


def quant_heatmap(table: pd.DataFrame, unit_kind: str = "layer", metric: str = "kl") -> go.Figure:
    """Damage of quantizing one unit at a time (rows) in each format (columns)."""
    sub = table[table["unit_kind"] == unit_kind]
    rows = list(dict.fromkeys(sub["unit"]))
    cols = list(dict.fromkeys(sub["format"]))
    grid = sub.pivot(index="unit", columns="format", values=metric).reindex(index=rows, columns=cols)
    z = grid.to_numpy()
    label = {"kl": "KL (nats/token)", "delta_loss": "Δ loss (nats)", "top1_agreement": "top-1 agreement"}[metric]
    show = np.log10(np.clip(z, 1e-8, None)) if metric == "kl" else z
    heat = go.Heatmap(z=show, x=cols, y=rows, customdata=z, colorscale="Viridis" if metric != "top1_agreement" else
                      "Viridis_r", colorbar=dict(title="log10 KL" if metric == "kl" else label),
                      hovertemplate="%{y}<br>%{x}<br>" + label + " %{customdata:.4g}<extra></extra>")
    return go.Figure(heat, layout=dict(title=f"Measured damage per {unit_kind} and format: {label}",
                                       height=max(300, 22 * len(rows) + 160), margin=_MARGIN,
                                       yaxis=dict(autorange="reversed")))


def quant_scatter(omega: pd.DataFrame, correlation: pd.DataFrame, fmt: str) -> go.Figure:
    """Predicted sensitivity Omega against measured KL, one point per matrix, for one format."""
    g = omega[omega["format"] == fmt]
    rho = correlation.set_index("format")["spearman"].get(fmt, float("nan"))
    pts = go.Scatter(x=g["omega"], y=g["kl"], mode="markers", text=g["unit"], marker=dict(size=9),
                     customdata=g[["type", "trace_per_param"]].to_numpy(),
                     hovertemplate="%{text}<br>%{customdata[0]}<br>Ω %{x:.3g}<br>KL %{y:.3g}<br>"
                                   "Tr(H)/n %{customdata[1]:.3g}<extra></extra>")
    positive = (g["omega"] > 0).all() and (g["kl"] > 0).all()
    axis = dict(type="log") if positive else {}
    return go.Figure(pts, layout=dict(title=f"Predicted Ω against measured KL, {fmt} (Spearman ρ = {rho:.3f})",
                                      height=420, margin=_MARGIN, xaxis=dict(title="Ω = Tr(H)/n · ‖Q(W) − W‖²",
                                                                            **axis),
                                      yaxis=dict(title="measured KL (nats/token)", **axis)))


def sensitivity_figures(result: Result, fmt: str | None = None) -> dict[str, go.Figure]:
    t = result.table
    kinds = [k for k in ("layer", "type", "matrix", "activation") if (t["unit_kind"] == k).any()]
    figs = {f"heatmap_{k}": quant_heatmap(t, k) for k in kinds[:2]}
    corr = result.extra["correlation"]
    if len(corr):
        figs["predicted_vs_measured"] = quant_scatter(result.extra["omega"], corr, fmt or corr["format"].iloc[0])
    return figs


def pareto_plot(pareto: pd.DataFrame, measured: pd.DataFrame) -> go.Figure:
    traces = [go.Scatter(x=pareto["avg_bits"], y=pareto["total_omega"], mode="lines+markers", name="Pareto frontier",
                         line=dict(shape="hv"),
                         hovertemplate="%{x:.3f} bits/weight<br>total Ω %{y:.4g}<extra></extra>")]
    pick = pareto[pareto["chosen"]]
    traces.append(go.Scatter(x=pick["avg_bits"], y=pick["total_omega"], mode="markers", name="chosen",
                             marker=dict(size=16, symbol="star", color="#d62728")))
    uni = measured[measured["assignment"] != "chosen"]
    traces.append(go.Scatter(x=uni["avg_bits"], y=uni["predicted_omega"], mode="markers+text", name="uniform",
                             text=uni["assignment"], textposition="top center", marker=dict(size=9, color="#7f7f7f")))
    return go.Figure(traces, layout=dict(title="Model size against predicted damage", height=420, margin=_MARGIN,
                                         xaxis_title="average bits per weight", yaxis=dict(title="total Ω",
                                                                                           type="log")))


def allocation_figures(result: Result) -> dict[str, go.Figure]:
    return {"pareto": pareto_plot(result.extra["pareto"], result.extra["measured"])}


def traces_plot(traces: pd.DataFrame) -> go.Figure:
    """Tr(H)/n per weight matrix with its standard error, in the model's order."""
    pts = go.Scatter(x=traces["unit"], y=traces["trace_per_param"], mode="markers",
                     error_y=dict(type="data", array=traces["trace_per_param_se"]), marker=dict(size=7),
                     customdata=traces[["type", "samples"]].to_numpy(),
                     hovertemplate="%{x}<br>%{customdata[0]}<br>Tr(H)/n %{y:.3g}<br>%{customdata[1]} samples"
                                   "<extra></extra>")
    return go.Figure(pts, layout=dict(title="Hessian trace per parameter of each weight matrix (Hutchinson)",
                                      height=420, margin=_MARGIN, xaxis=dict(title="", showticklabels=False),
                                      yaxis_title="Tr(H)/n"))


def traces_figures(result: Result) -> dict[str, go.Figure]:
    return {"traces": traces_plot(result.table)}
