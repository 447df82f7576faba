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


def _log_floor(values: pd.Series) -> float:
    """Where a log axis draws a value at or below zero: a decade under the smallest positive value."""
    pos = values[values > 0]
    return float(pos.min()) / 10 if len(pos) else 1e-12


def quant_scatter(omega: pd.DataFrame, correlation: pd.DataFrame, fmt: str) -> go.Figure:
    """Predicted sensitivity Omega against measured KL, one point per matrix, for one format, on log axes (Omega
    and KL span decades: on linear axes one outlier squashes the rest into a corner). A value at or below zero
    (a negative trace, or a KL that rounds to zero) has no place on a log axis: it is drawn a decade below the
    smallest positive value, as a hollow triangle, with its true value in the hover."""
    g = omega[omega["format"] == fmt]
    rho = correlation.set_index("format")["spearman"].get(fmt, float("nan"))
    x_floor, y_floor = _log_floor(g["omega"]), _log_floor(g["kl"])
    bad = (g["omega"] <= 0) | (g["kl"] <= 0)
    hover = ("%{text}<br>%{customdata[0]}<br>Ω %{customdata[2]:.3g}<br>KL %{customdata[3]:.3g}<br>"
             "Tr(H)/n %{customdata[1]:.3g}<extra></extra>")
    traces = []
    for part, name, marker in ((g[~bad], "matrix", dict(size=9)),
                               (g[bad], f"Ω or KL ≤ 0 (drawn at {x_floor:.2g} / {y_floor:.2g})",
                                dict(size=10, symbol="triangle-down-open", color="#d62728"))):
        if len(part) or name == "matrix":
            traces.append(go.Scatter(x=part["omega"].clip(lower=x_floor), y=part["kl"].clip(lower=y_floor),
                                     mode="markers", name=name, text=part["unit"], marker=marker,
                                     customdata=part[["type", "trace_per_param", "omega", "kl"]].to_numpy(),
                                     hovertemplate=hover))
    return go.Figure(traces, layout=dict(title=f"Predicted Ω against measured KL, {fmt} (Spearman ρ = {rho:.3f})",
                                         height=420, margin=_MARGIN, showlegend=bool(bad.any()),
                                         xaxis=dict(title="Ω = Tr(H)/n · ‖Q(W) − W‖² (log)", type="log"),
                                         yaxis=dict(title="measured KL (nats/token, log)", type="log")))


def sensitivity_figures(result: Result, fmt: str | None = None) -> dict[str, go.Figure]:
    t = result.table
    kinds = [k for k in ("layer", "type", "matrix", "activation") if (t["unit_kind"] == k).any()]
    figs = {f"heatmap_{k}": quant_heatmap(t, k) for k in kinds[:2]}
    corr = result.extra["correlation"]
    if len(corr):
        figs["predicted_vs_measured"] = quant_scatter(result.extra["omega"], corr, fmt or corr["format"].iloc[0])
    return figs


def pareto_plot(pareto: pd.DataFrame, measured: pd.DataFrame) -> go.Figure:
    """Size against predicted total Omega: the frontier of the monotone assignments, each candidate measured
    (its held-out KL in the hover) and the one chosen."""
    traces = [go.Scatter(x=pareto["avg_bits"], y=pareto["total_omega"], mode="lines+markers", name="Pareto frontier",
                         line=dict(shape="hv"),
                         hovertemplate="%{x:.3f} bits/weight<br>total Ω %{y:.4g}<extra></extra>")]
    hover = ("%{text}<br>%{x:.3f} bits/weight<br>total Ω %{y:.4g}<br>KL %{customdata[0]:.4g} (traces' text), "
             "%{customdata[1]:.4g} (held out)<extra></extra>")
    for name, part, marker in (("candidates", measured[~measured["chosen"]], dict(size=9, color="#7f7f7f")),
                               ("chosen", measured[measured["chosen"]],
                                dict(size=16, symbol="star", color="#d62728"))):
        traces.append(go.Scatter(x=part["avg_bits"], y=part["predicted_omega"], mode="markers+text", name=name,
                                 text=part["assignment"], textposition="top center", marker=marker,
                                 customdata=part[["kl_calibration", "kl_held_out"]].to_numpy(),
                                 hovertemplate=hover))
    return go.Figure(traces, layout=dict(title="Model size against predicted damage", height=420, margin=_MARGIN,
                                         xaxis_title="average bits per weight", yaxis=dict(title="total Ω",
                                                                                           type="log")))


def allocation_figures(result: Result) -> dict[str, go.Figure]:
    return {"pareto": pareto_plot(result.extra["pareto"], result.extra["measured"])}


def traces_plot(traces: pd.DataFrame) -> go.Figure:
    """Tr(H)/n per weight matrix with its 95% interval, in the model's order."""
    mean = traces["trace_per_param"]
    pts = go.Scatter(x=traces["unit"], y=mean, mode="markers",
                     error_y=dict(type="data", symmetric=False, array=traces["trace_per_param_high"] - mean,
                                  arrayminus=mean - traces["trace_per_param_low"]), marker=dict(size=7),
                     customdata=traces[["type", "samples"]].to_numpy(),
                     hovertemplate="%{x}<br>%{customdata[0]}<br>Tr(H)/n %{y:.3g}<br>%{customdata[1]} samples"
                                   "<extra></extra>")
    return go.Figure(pts, layout=dict(title="Hessian trace per parameter of each weight matrix (Hutchinson, 95% "
                                            "intervals)",
                                      height=420, margin=_MARGIN, xaxis=dict(title="", showticklabels=False),
                                      yaxis_title="Tr(H)/n"))


def traces_figures(result: Result) -> dict[str, go.Figure]:
    return {"traces": traces_plot(result.table)}
