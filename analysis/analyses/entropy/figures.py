"""Entropy figures: attention entropy per head, predictive entropy per token, both over training."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...plots import token_labels
from ...result import Result


def training_axis(df: pd.DataFrame) -> tuple[pd.Series, dict]:
    """The x values of a plot over a checkpoint series and its axis: the training step when every checkpoint's
    is known, else the checkpoints' labels in the order given."""
    if df["step"].notna().all():
        return df["step"], dict(title="training step")
    return df["checkpoint"], dict(title="checkpoint", type="category",
                                  categoryorder="array", categoryarray=list(dict.fromkeys(df["checkpoint"])))


def attention_entropy_heatmap(heads: pd.DataFrame, checkpoint: str) -> go.Figure:
    """Layer x head normalised attention entropy at one checkpoint; collapsed heads marked."""
    sub = heads[heads["checkpoint"] == checkpoint]
    L, H = int(sub["layer"].max()) + 1, int(sub["head"].max()) + 1
    z = np.full((L, H), np.nan)
    text = np.full((L, H), "", dtype=object)
    z[sub["layer"].to_numpy(), sub["head"].to_numpy()] = sub["norm_entropy"].to_numpy()
    text[sub["layer"].to_numpy(), sub["head"].to_numpy()] = np.where(sub["collapsed"], "collapsed", "")
    heat = go.Heatmap(z=z, x=[f"H{h}" for h in range(H)], y=[f"L{layer}" for layer in range(L)], text=text,
                      texttemplate="%{text}", colorscale="Viridis", zmin=0, zmax=1, colorbar_title="H / log keys",
                      hovertemplate="%{y} %{x}<br>normalised entropy %{z:.3f}<extra></extra>")
    return go.Figure(heat, layout=dict(title=f"Attention entropy per head, normalised ({checkpoint})",
                                       height=max(280, 40 * L), margin=_MARGIN, yaxis=dict(autorange="reversed")))


def predictive_entropy_heatmap(pred: pd.DataFrame, tokens: pd.DataFrame, checkpoint: str) -> go.Figure:
    """Layer x position predictive entropy (logit lens at resid_post) at one checkpoint; forking tokens starred."""
    sub = pred[pred["checkpoint"] == checkpoint]
    L, P = int(sub["layer"].max()) + 1, len(tokens)
    z = np.full((L, P), np.nan)
    z[sub["layer"].to_numpy(), sub["pos"].to_numpy()] = sub["entropy"].to_numpy()
    fork = set(sub.loc[sub["forking"], "pos"])
    labels = [("★ " if p in fork else "") + lab for p, lab in zip(tokens["pos"], token_labels(tokens))]
    heat = go.Heatmap(z=z, x=labels, y=[f"L{layer}" for layer in range(L)], colorscale="Magma",
                      colorbar_title="nats", hovertemplate="%{y} · %{x}<br>entropy %{z:.3f} nats<extra></extra>")
    return go.Figure(heat, layout=dict(title=f"Predictive entropy through the layers ({checkpoint}; ★ forking tokens)",
                                       height=max(280, 40 * L), margin=_MARGIN, xaxis=dict(tickangle=-60),
                                       yaxis=dict(autorange="reversed")))


def entropy_over_training(heads: pd.DataFrame, summary: pd.DataFrame) -> go.Figure:
    """Mean normalised attention entropy per layer over training steps, and the final layer's mean predictive
    entropy (right axis). The legend lies in rows under the plot, anchored to the figure's bottom edge, so it can
    meet neither the right axis's title (a legend at the right did) nor the x axis title; a model with many layers
    gets a taller figure so that the plot keeps its height (measured in Chromium: 6 and 30 layers, 600 and 1100
    pixels wide, no overlap)."""
    per_layer = heads.groupby(["layer", "checkpoint", "step"], sort=False, dropna=False)["norm_entropy"].mean() \
        .reset_index()
    lines = [go.Scatter(x=training_axis(g)[0], y=g["norm_entropy"], mode="lines+markers",
                        name=f"attention L{layer}") for layer, g in per_layer.groupby("layer")]
    x, axis = training_axis(summary)
    lines.append(go.Scatter(x=x, y=summary["mean_predictive_entropy"], mode="lines+markers",
                            name="predictive (final layer)", yaxis="y2",
                            line=dict(dash="dash", width=3)))
    return go.Figure(lines, layout=dict(
        title="Entropy over training", height=420 + 12 * max(0, len(lines) - 8), margin=_MARGIN,
        xaxis=axis, yaxis=dict(title="normalised attention entropy", range=[0, 1]),
        yaxis2=dict(title="predictive entropy (nats)", overlaying="y", side="right", showgrid=False),
        legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, xanchor="left", x=0)))


def figures(result: Result, checkpoint: str | None = None) -> dict[str, go.Figure]:
    heads = result.table
    checkpoint = result.meta["checkpoints"][-1] if checkpoint is None else checkpoint
    return {"attention": attention_entropy_heatmap(heads, checkpoint),
            "predictive": predictive_entropy_heatmap(result.extra["predictive"], result.extra["tokens"], checkpoint),
            "training": entropy_over_training(heads, result.extra["over_training"])}
