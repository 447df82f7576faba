"""Figures of the Features page: SAE training and density, one feature's page, attribution against patching,
steering before/after, and the discover-then-name bottleneck beside the probe bottleneck."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN
from ...result import Result


def training_curve(loss: pd.DataFrame) -> go.Figure:
    fig = go.Figure([go.Scatter(x=loss["step"], y=loss["mse_over_variance"], name="1 - FVE (batch)", mode="lines"),
                     go.Scatter(x=loss["step"], y=loss["dead"], name="dead features", mode="lines", yaxis="y2")])
    fig.update_layout(title="Training: reconstruction error over the inputs' variance, and dead features",
                      height=320, margin=MARGIN, xaxis_title="step",
                      yaxis=dict(title="1 - FVE", type="log", dtick=1, exponentformat="power"),
                      yaxis2=dict(title="dead", overlaying="y", side="right", rangemode="tozero", showgrid=False),
                      legend=dict(x=0.7, y=0.95))
    return fig


def density_histogram(per_feature: pd.DataFrame) -> go.Figure:
    d = per_feature["density"].to_numpy()
    logd = np.log10(np.where(d > 0, d, np.nan))
    fig = go.Figure(go.Histogram(x=logd[~np.isnan(logd)], nbinsx=40))
    fig.update_layout(title=f"Feature density (log10 of the fraction of training tokens a feature fires on; "
                            f"{int((d == 0).sum())} dead)", height=300, margin=MARGIN,
                      xaxis_title="log10 density", yaxis_title="features")
    return fig


def sae_figures(result: Result) -> dict[str, go.Figure]:
    figs = {"density": density_histogram(result.table)}
    if len(result.extra.get("loss", [])):
        figs["training"] = training_curve(result.extra["loss"])
    return figs


def feature_histogram(histograms: pd.DataFrame, feature: int) -> go.Figure:
    h = histograms[histograms["feature"] == feature]
    fig = go.Figure(go.Bar(x=(h["low"] + h["high"]) / 2, y=h["count"], width=(h["high"] - h["low"]) * 0.95,
                           hovertemplate="%{x:.2f}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=f"Feature {feature}: non-zero activations", height=280, margin=MARGIN,
                      xaxis_title="activation", yaxis_title="tokens")
    return fig


def logit_bars(logits: pd.DataFrame, feature: int) -> go.Figure:
    t = logits[logits["feature"] == feature]
    up, down = t[t["direction"] == "promotes"], t[t["direction"] == "suppresses"]
    fig = go.Figure([go.Bar(y=[repr(s) for s in up["token"]], x=up["effect"], orientation="h", name="promotes",
                            marker_color="#2b8cbe"),
                     go.Bar(y=[repr(s) for s in down["token"]], x=down["effect"], orientation="h", name="suppresses",
                            marker_color="#de2d26")])
    fig.update_layout(title=f"Feature {feature}: logit effect of its decoder direction (W_dec · W_U)",
                      height=max(280, 22 * len(t) + 100), margin=MARGIN, xaxis_title="logit effect",
                      yaxis=dict(autorange="reversed"))
    return fig


def context_html(tokens: list[str], acts, peak: float, max_index: int) -> str:
    """One top-activating context: each token (escaped) on a background as strong as its activation."""
    parts = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, float(a) / peak))
        border = "border-bottom:2px solid #b30000;" if i == max_index else ""
        text = html.escape(t).replace(" ", "&nbsp;").replace("\n", "⏎")
        parts.append(f'<span title="{float(a):.3f}" style="background:rgba(255,80,0,{alpha:.2f});{border}'
                     f'font-family:monospace">{text}</span>')
    return "".join(parts)


def attribution_scatter(table: pd.DataFrame) -> go.Figure:
    t = table.dropna(subset=["activation"])
    traces = []
    for method, colour in (("atp", "#1f77b4"), ("relp", "#d62728")):
        traces.append(go.Scatter(x=t["activation"], y=t[method], mode="markers", name=method.upper() if method ==
                                 "atp" else "RelP", marker=dict(color=colour, size=5, opacity=0.6),
                                 customdata=t[["pair", "position", "feature"]].to_numpy(),
                                 hovertemplate="pair %{customdata[0]}, position %{customdata[1]}, feature "
                                               "%{customdata[2]}<br>patching %{x:.4f}<br>estimate %{y:.4f}"
                                               "<extra></extra>"))
    lo = float(np.nanmin([t["activation"].min(), t["atp"].min(), t["relp"].min()])) if len(t) else 0.0
    hi = float(np.nanmax([t["activation"].max(), t["atp"].max(), t["relp"].max()])) if len(t) else 1.0
    traces.append(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="grey", dash="dot"),
                             name="y = x", hoverinfo="skip"))
    return go.Figure(traces, layout=dict(title="Each (pair, position, feature): estimate against activation patching",
                                         height=420, margin=MARGIN, xaxis_title="activation patching (Δ metric)",
                                         yaxis_title="AtP / RelP estimate"))


def top_features_bar(by_feature: pd.DataFrame, n: int = 20) -> go.Figure:
    t = by_feature.head(n)
    names = [f"feature {f}" for f in t["feature"]]
    fig = go.Figure([go.Bar(y=names, x=t[m], orientation="h", name=label)
                     for m, label in (("activation", "patching"), ("atp", "AtP"), ("relp", "RelP"))])
    fig.update_layout(title="Features with the largest |AtP| (summed over positions, mean over pairs)",
                      height=max(300, 24 * len(t) + 120), margin=MARGIN, barmode="group",
                      yaxis=dict(autorange="reversed"), xaxis_title="Δ metric")
    return fig


def steer_bars(table: pd.DataFrame) -> go.Figure:
    t = table.head(15)
    labels = [repr(s) for s in t["token"]]
    fig = go.Figure([go.Bar(x=labels, y=t["p_before"], name="before"), go.Bar(x=labels, y=t["p_after"], name="after")])
    fig.update_layout(title="Next-token probabilities before and after steering", height=340, margin=MARGIN,
                      barmode="group", yaxis_title="probability")
    return fig


def names_summary(summary: pd.DataFrame) -> go.Figure:
    fig = go.Figure([go.Bar(y=summary["bottleneck"], x=summary["accuracy"], orientation="h", name="accuracy"),
                     go.Bar(y=summary["bottleneck"], x=summary["random_accuracy"], orientation="h",
                            name="random baseline (leakage)")])
    fig.update_layout(title="Held-out accuracy of each bottleneck and of its random baseline", height=320,
                      margin=MARGIN, barmode="group", xaxis=dict(title="accuracy", range=[0, 1.02]))
    return fig


def features_figures(result: Result) -> dict[str, go.Figure]:
    """Report figures of a feature-pages run: the most frequent live feature's page."""
    t = result.table[result.table["density"] > 0]
    if t.empty:
        return {}
    f = int(t.sort_values("max_activation", ascending=False)["feature"].iloc[0])
    return {"histogram": feature_histogram(result.extra["histograms"], f),
            "logits": logit_bars(result.extra["logits"], f)}
