"""Patching figures: a heatmap per method and component, and each estimator against activation patching."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...plots import token_labels
from ...result import Result
from ...stats import pearson, sign_flip_floor, unreachable_note


def _patching_grid(sub: pd.DataFrame, tokens: pd.DataFrame) -> tuple[np.ndarray, list[str], list[str], str]:
    """A 2-D grid for one method x component: rows are layers (or layer.head), columns positions or heads."""
    has = {c: sub[c].notna().any() for c in ("pos", "head", "dest_pos")}
    labels = token_labels(tokens)
    layers = sorted(sub["layer"].unique())
    if has["head"] and (has["pos"] or has["dest_pos"]):
        col = "pos" if has["pos"] else "dest_pos"
        heads = sorted(sub["head"].unique())
        rows = [(layer, head) for layer in layers for head in heads]
        grid = np.full((len(rows), len(tokens)), np.nan)
        r = {k: i for i, k in enumerate(rows)}
        for layer, head, c, v in zip(sub["layer"], sub["head"], sub[col], sub["value"]):
            grid[r[(layer, head)], int(c)] = v
        return grid, [f"L{a}H{b}" for a, b in rows], labels, "position" if col == "pos" else "destination position"
    if has["head"]:
        heads = sorted(sub["head"].unique())
        grid = np.full((len(layers), len(heads)), np.nan)
        grid[sub["layer"].to_numpy(dtype=int), sub["head"].to_numpy(dtype=int)] = sub["value"].to_numpy()
        return grid, [f"L{a}" for a in layers], [f"H{h}" for h in heads], "head"
    grid = np.full((len(layers), len(tokens)), np.nan)
    grid[sub["layer"].to_numpy(dtype=int), sub["pos"].to_numpy(dtype=int)] = sub["value"].to_numpy()
    return grid, [f"L{a}" for a in layers], labels, "position"


def patching_heatmap(table: pd.DataFrame, tokens: pd.DataFrame, method: str, component: str,
                     metric: str = "") -> go.Figure:
    sub = table[(table["method"] == method) & (table["component"] == component)]
    grid, ylab, xlab, xtitle = _patching_grid(sub, tokens)
    finite = grid[np.isfinite(grid)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    heat = go.Heatmap(z=grid, x=xlab, y=ylab, colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound,
                      colorbar_title=metric or "value",
                      hovertemplate="%{y} · %{x}<br>%{z:.4f}<extra></extra>")
    return go.Figure(heat, layout=dict(
        title=f"{method} patching · {component}", height=max(300, 26 * len(ylab) + 120), margin=_MARGIN,
        xaxis=dict(title=xtitle, tickangle=-60 if xtitle != "head" else 0),
        yaxis=dict(title="layer", autorange="reversed")))


def comparison_scatter(table: pd.DataFrame, method: str, component: str) -> go.Figure:
    key = ["component", "layer", "pos", "head", "dest_pos"]
    truth = table[(table["method"] == "activation") & (table["component"] == component)]
    est = table[(table["method"] == method) & (table["component"] == component)]
    both = truth.merge(est, on=key, suffixes=("_act", "_est")).dropna(subset=["value_act", "value_est"])
    label = [f"L{r.layer}" + (f"H{r.head}" if pd.notna(r.head) else "") + (f" pos {r.pos}" if pd.notna(r.pos) else "")
             for r in both.itertuples()]
    r = pearson(both["value_act"], both["value_est"]) if len(both) > 2 else float("nan")
    lo = float(min(both["value_act"].min(), both["value_est"].min())) if len(both) else 0.0
    hi = float(max(both["value_act"].max(), both["value_est"].max())) if len(both) else 1.0
    fig = go.Figure([
        go.Scatter(x=both["value_act"], y=both["value_est"], mode="markers", text=label, name=method,
                   hovertemplate="%{text}<br>activation %{x:.4f}<br>" + method + " %{y:.4f}<extra></extra>"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), name="y = x"),
    ], layout=dict(title=f"{method} vs activation patching · {component} · Pearson r = {r:.3f}", height=420,
                   margin=_MARGIN, xaxis_title="activation patching", yaxis_title=method, showlegend=False))
    return fig


def node_label(r, tokens: dict) -> str:
    pos = r.pos if pd.notna(r.pos) else r.dest_pos
    return (f"L{r.layer}" + (f"H{r.head}" if pd.notna(r.head) else "")
            + (f" {tokens.get(int(pos), '')!r}@{int(pos)}" if pd.notna(pos) else ""))


def top_nodes_with_intervals(table: pd.DataFrame, per_pair: pd.DataFrame, tokens: pd.DataFrame, method: str,
                             component: str, k: int = 15, metric: str = "") -> go.Figure:
    """The k nodes with the largest |effect|: each pair's value (grey dots), the mean over pairs and its 95%
    bootstrap interval (error bar), and for activation patching the sign-flip p-value in the hover, with the
    smallest p the test can give (when the table has p_min: see `p_floor`)."""
    key = ["layer", "pos", "head", "dest_pos"]
    sub = table[(table["method"] == method) & (table["component"] == component)].dropna(subset=["value"])
    top = sub.reindex(sub["value"].abs().sort_values(ascending=False).index).head(k).iloc[::-1]
    names = dict(zip(tokens["pos"], tokens["token"]))
    labels = [node_label(r, names) for r in top.itertuples()]
    pp = per_pair[(per_pair["method"] == method) & (per_pair["component"] == component)]
    strip = top[key].assign(label=labels).merge(pp, on=key, how="left")
    floor = top["p_min"] if "p_min" in top else pd.Series(np.nan, index=top.index)
    p_text = [f"p = {p:.3g}" + (f" (the smallest this test can give: {m:.3g})" if pd.notna(m) else "")
              if pd.notna(p) else "" for p, m in zip(top["p_value"], floor)]
    return go.Figure([
        go.Scatter(x=strip["value"], y=strip["label"], mode="markers", name="one pair",
                   marker=dict(color="rgba(120,120,120,0.45)", size=6), customdata=strip["pair"],
                   hovertemplate="%{y} · pair %{customdata}<br>%{x:.4f}<extra></extra>"),
        go.Scatter(x=top["value"], y=labels, mode="markers", name="mean, 95% interval",
                   marker=dict(color="#1f5fa8", size=10, symbol="diamond"), text=p_text,
                   error_x=dict(type="data", symmetric=False, array=top["ci_high"] - top["value"],
                                arrayminus=top["value"] - top["ci_low"], thickness=2),
                   hovertemplate="%{y}<br>mean %{x:.4f}<br>%{text}<extra></extra>"),
    ], layout=dict(title=f"{method} · {component}: top {len(top)} nodes, each pair and the mean with its 95% "
                         "bootstrap interval", height=max(320, 24 * len(top) + 140), margin=_MARGIN,
                   xaxis_title=metric or "value", legend=dict(orientation="h", y=-0.15)))


def p_floor(table: pd.DataFrame, meta: dict) -> tuple[pd.DataFrame, str]:
    """(the table with its p_min column, the note to show beside the p-values or ""): p_min is the smallest
    p-value the sign-flip test can give a node with these pairs (compute.py); a run stored before that column
    existed gets the design's floor, 2 / 2^n for n pairs. The note says when no node can reach p < 0.05."""
    if "p_value" not in table or not table["p_value"].notna().any():
        return table, ""
    n = int(meta.get("n_pairs", 0))
    if "p_min" not in table:
        table = table.copy()
        table.insert(table.columns.get_loc("p_value") + 1, "p_min",
                     np.where(table["p_value"].notna(), sign_flip_floor(n), np.nan))
    return table, meta.get("p_note", unreachable_note(float(table["p_min"].min()), n))


def figures(result: Result, method: str | None = None, component: str | None = None) -> dict[str, go.Figure]:
    t, _ = p_floor(result.table, result.meta)
    method = method or t["method"].iloc[0]
    component = component or t["component"].iloc[0]
    figs = {"heatmap": patching_heatmap(t, result.extra["tokens"], method, component, result.meta.get("metric", "")),
            "top_nodes": top_nodes_with_intervals(t, result.extra["per_pair"], result.extra["tokens"], method,
                                                  component, metric=result.meta.get("metric", ""))}
    if method != "activation" and (t["method"] == "activation").any():
        figs["comparison"] = comparison_scatter(t, method, component)
    return figs
