"""The dose-response curve of a concept intervention."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...result import Result


def dose_response(table: pd.DataFrame, groups: pd.DataFrame, toward: str = "") -> go.Figure:
    """Probability of each tracked token (thin) and of each group (thick) against the amount pushed."""
    traces = []
    colours = {"up": "#2ca02c", "down": "#d62728"}
    for group, label in (("up", "expected to rise"), ("down", "expected to fall")):
        traces.append(go.Scatter(x=groups["amount"], y=groups[group], mode="lines+markers", name=f"{label} (sum)",
                                 line=dict(color=colours[group], width=4),
                                 hovertemplate=f"{label}<br>amount %{{x}}<br>total probability %{{y:.4f}}"
                                               "<extra></extra>"))
        for token, g in table[table["group"] == group].groupby("token", sort=False):
            traces.append(go.Scatter(x=g["amount"], y=g["prob"], mode="lines", name=repr(token),
                                     line=dict(color=colours[group], width=1), opacity=0.5,
                                     hovertemplate=f"{token!r}<br>amount %{{x}}<br>probability %{{y:.4f}}"
                                                   "<extra></extra>"))
    return go.Figure(traces, layout=dict(title=f"Dose-response: pushing toward {toward!r}" if toward else
                                         "Dose-response", height=420, margin=_MARGIN,
                                         xaxis_title="amount (fractions of the mean residual norm)",
                                         yaxis_title="probability at the last position"))


def log_odds_curve(groups: pd.DataFrame, meta: dict) -> go.Figure:
    """Log-odds of the rising against the falling group by amount, with the band over probe refits."""
    g = groups.sort_values("amount")
    traces = []
    if "log_odds_low" in g:
        traces.append(go.Scatter(x=[*g["amount"], *g["amount"][::-1]], y=[*g["log_odds_high"],
                                                                         *g["log_odds_low"][::-1]],
                                 fill="toself", line=dict(width=0), fillcolor="rgba(31,95,168,0.2)",
                                 name="95% over probe refits", hoverinfo="skip"))
    traces.append(go.Scatter(x=g["amount"], y=g["log_odds"], mode="lines+markers", name="the stored probe",
                             line=dict(color="#1f5fa8", width=3),
                             hovertemplate="amount %{x}<br>log-odds %{y:.3f}<extra></extra>"))
    title = "log P(rising) − log P(falling)"
    if "monotone_refits" in meta:
        title += f" · monotone for {100 * meta['monotone_refits']:.0f}% of {meta['refits']} probe refits"
    return go.Figure(traces, layout=dict(title=title, height=360, margin=_MARGIN,
                                         xaxis_title="amount (fractions of the mean residual norm)",
                                         yaxis_title="log-odds (nats)"))


def figures(result: Result) -> dict[str, go.Figure]:
    return {"dose_response": dose_response(result.table, result.extra["groups"], result.meta.get("toward", "")),
            "log_odds": log_odds_curve(result.extra["groups"], result.meta)}
