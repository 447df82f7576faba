"""Plotly figures built from stored results: the same figures on a page, in an HTML report and in benchmarks.

Built with plotly.graph_objects and the layout passed to the constructor: plotly.express takes ~40 ms a figure
here, which would be most of the 200 ms budget for reopening a stored view.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .store import Result

_MARGIN = dict(l=0, r=0, t=40, b=0)


def token_labels(tokens: pd.DataFrame) -> list[str]:
    """Unique axis labels for token positions: "3:' John'"."""
    return [f"{p}:{t!r}" for p, t in zip(tokens["pos"], tokens["token"])]


def predictions_bar(preds: pd.DataFrame) -> go.Figure:
    rev = preds.iloc[::-1]
    labels = [f"{r}. {t!r}" for r, t in zip(rev["rank"], rev["token"])]
    bar = go.Bar(x=rev["prob"].to_numpy(), y=labels, orientation="h", customdata=rev[["logit", "token_id"]].to_numpy(),
                 hovertemplate="%{y}<br>probability %{x:.4f}<br>logit %{customdata[0]:.3f}<br>"
                               "token id %{customdata[1]}<extra></extra>")
    return go.Figure(bar, layout=dict(title="Next-token predictions", height=max(250, 26 * len(preds)),
                                      margin=_MARGIN, xaxis_title="probability"))


def attention_heatmap(att: pd.DataFrame, tokens: pd.DataFrame, layer: int, head: int) -> go.Figure:
    sub = att[(att["layer"] == layer) & (att["head"] == head)]
    n = len(tokens)
    grid = np.full((n, n), np.nan)  # [query_pos, key_pos]; above the diagonal stays empty (causal)
    grid[sub["query_pos"].to_numpy(), sub["key_pos"].to_numpy()] = sub["weight"].to_numpy()
    labels = token_labels(tokens)
    heat = go.Heatmap(z=grid, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, colorbar_title="weight",
                      hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>")
    return go.Figure(heat, layout=dict(
        title=f"Attention pattern, layer {layer} head {head}", height=max(320, 22 * n), margin=_MARGIN,
        xaxis=dict(title="key", tickangle=-60), yaxis=dict(title="query", autorange="reversed")))


def model_view_figures(result: Result, layer: int = 0, head: int = 0) -> dict[str, go.Figure]:
    return {
        "predictions": predictions_bar(result.table),
        "attention": attention_heatmap(result.extra["attention"], result.extra["tokens"], layer, head),
    }


FIGURES = {"model": model_view_figures}


# ----------------------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------------------
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
    r = float(np.corrcoef(both["value_act"], both["value_est"])[0, 1]) if len(both) > 2 else float("nan")
    lo = float(min(both["value_act"].min(), both["value_est"].min())) if len(both) else 0.0
    hi = float(max(both["value_act"].max(), both["value_est"].max())) if len(both) else 1.0
    fig = go.Figure([
        go.Scatter(x=both["value_act"], y=both["value_est"], mode="markers", text=label, name=method,
                   hovertemplate="%{text}<br>activation %{x:.4f}<br>" + method + " %{y:.4f}<extra></extra>"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), name="y = x"),
    ], layout=dict(title=f"{method} vs activation patching · {component} · Pearson r = {r:.3f}", height=420,
                   margin=_MARGIN, xaxis_title="activation patching", yaxis_title=method, showlegend=False))
    return fig


def patching_figures(result: Result, method: str | None = None, component: str | None = None) -> dict[str, go.Figure]:
    t = result.table
    method = method or t["method"].iloc[0]
    component = component or t["component"].iloc[0]
    figs = {"heatmap": patching_heatmap(t, result.extra["tokens"], method, component, result.meta.get("metric", ""))}
    if method != "activation" and (t["method"] == "activation").any():
        figs["comparison"] = comparison_scatter(t, method, component)
    return figs


FIGURES["patching"] = patching_figures


# ----------------------------------------------------------------------------------------------------------
# Logit lens
# ----------------------------------------------------------------------------------------------------------
LENS_COLOURS = {"final_prob": ("probability of the model's final prediction", "Viridis", 0.0, 1.0),
                "top_prob": ("probability of the lens's top token", "Viridis", 0.0, 1.0),
                "entropy": ("entropy (nats)", "Magma", None, None),
                "kl_to_final": ("KL from the final distribution (nats)", "Magma", None, None)}


def lens_heatmap(table: pd.DataFrame, tokens: pd.DataFrame, site: str = "resid_post",
                 colour: str = "final_prob", lens: str = "logit") -> go.Figure:
    """Layer x position, coloured by `colour`, the lens's top token written in each cell."""
    sub = table[(table["site"] == site) & (table["lens"] == lens)]
    n_layers, n_pos = int(sub["layer"].max()) + 1, len(tokens)
    z = np.full((n_layers, n_pos), np.nan)
    text = np.full((n_layers, n_pos), "", dtype=object)
    li, pi = sub["layer"].to_numpy(), sub["pos"].to_numpy()
    z[li, pi] = sub[colour].to_numpy()
    text[li, pi] = [t.strip()[:8] for t in sub["top_token"]]
    title, scale, zmin, zmax = LENS_COLOURS[colour]
    custom = np.stack([np.full((n_layers, n_pos), ""), np.full((n_layers, n_pos), np.nan)], -1).astype(object)
    custom[li, pi, 0] = sub["final_token"].to_numpy()
    custom[li, pi, 1] = sub["final_prob"].to_numpy()
    heat = go.Heatmap(z=z, x=token_labels(tokens), y=[f"{site} {layer}" for layer in range(n_layers)], text=text,
                      texttemplate="%{text}", textfont=dict(size=9), colorscale=scale, zmin=zmin, zmax=zmax,
                      colorbar_title=colour, customdata=custom,
                      hovertemplate="%{y} · %{x}<br>top: %{text}<br>" + colour + " %{z:.4f}<br>final prediction "
                                    "%{customdata[0]!r}: p = %{customdata[1]:.4f}<extra></extra>")
    return go.Figure(heat, layout=dict(title=f"{lens.capitalize()} lens · {site} · {title}", height=max(300, 34 * n_layers),
                                       margin=_MARGIN, xaxis=dict(tickangle=-60), yaxis=dict(autorange="reversed")))


def lens_kl_by_layer(table: pd.DataFrame) -> go.Figure:
    """Mean KL from the final distribution per layer, one line per site (and per lens, when there are several)."""
    group = ["lens", "site"] if "lens" in table else ["site"]
    lines = []
    for key, g in table.groupby(group, sort=False):
        m = g.groupby("layer")["kl_to_final"].mean()
        name = " · ".join(key) if isinstance(key, tuple) else str(key)
        lines.append(go.Scatter(x=m.index.to_numpy(), y=m.to_numpy(), mode="lines+markers", name=name))
    return go.Figure(lines, layout=dict(title="KL from the model's final distribution, mean over positions",
                                        height=360, margin=_MARGIN, xaxis_title="layer", yaxis_title="nats"))


def lens_figures(result: Result, site: str | None = None, colour: str = "final_prob",
                 lens: str | None = None) -> dict[str, go.Figure]:
    t = result.table
    site = site or ("resid_post" if (t["site"] == "resid_post").any() else t["site"].iloc[0])
    lens = lens or t["lens"].iloc[0]
    return {"lens": lens_heatmap(t, result.extra["tokens"], site, colour, lens), "kl": lens_kl_by_layer(t)}


FIGURES["lens"] = lens_figures


# ----------------------------------------------------------------------------------------------------------
# Entropy
# ----------------------------------------------------------------------------------------------------------
def attention_entropy_heatmap(heads: pd.DataFrame, step: int) -> go.Figure:
    """Layer x head normalised attention entropy at one training step; collapsed heads marked."""
    sub = heads[heads["step"] == step]
    L, H = int(sub["layer"].max()) + 1, int(sub["head"].max()) + 1
    z = np.full((L, H), np.nan)
    text = np.full((L, H), "", dtype=object)
    z[sub["layer"].to_numpy(), sub["head"].to_numpy()] = sub["norm_entropy"].to_numpy()
    text[sub["layer"].to_numpy(), sub["head"].to_numpy()] = np.where(sub["collapsed"], "collapsed", "")
    heat = go.Heatmap(z=z, x=[f"H{h}" for h in range(H)], y=[f"L{layer}" for layer in range(L)], text=text,
                      texttemplate="%{text}", colorscale="Viridis", zmin=0, zmax=1, colorbar_title="H / log keys",
                      hovertemplate="%{y} %{x}<br>normalised entropy %{z:.3f}<extra></extra>")
    return go.Figure(heat, layout=dict(title=f"Attention entropy per head, normalised (step {step})",
                                       height=max(280, 40 * L), margin=_MARGIN, yaxis=dict(autorange="reversed")))


def predictive_entropy_heatmap(pred: pd.DataFrame, tokens: pd.DataFrame, step: int) -> go.Figure:
    """Layer x position predictive entropy (logit lens at resid_post) at one step; forking tokens starred."""
    sub = pred[pred["step"] == step]
    L, P = int(sub["layer"].max()) + 1, len(tokens)
    z = np.full((L, P), np.nan)
    z[sub["layer"].to_numpy(), sub["pos"].to_numpy()] = sub["entropy"].to_numpy()
    fork = set(sub.loc[sub["forking"], "pos"])
    labels = [("★ " if p in fork else "") + lab for p, lab in zip(tokens["pos"], token_labels(tokens))]
    heat = go.Heatmap(z=z, x=labels, y=[f"L{layer}" for layer in range(L)], colorscale="Magma",
                      colorbar_title="nats", hovertemplate="%{y} · %{x}<br>entropy %{z:.3f} nats<extra></extra>")
    return go.Figure(heat, layout=dict(title=f"Predictive entropy through the layers (step {step}; ★ forking tokens)",
                                       height=max(280, 40 * L), margin=_MARGIN, xaxis=dict(tickangle=-60),
                                       yaxis=dict(autorange="reversed")))


def entropy_over_training(heads: pd.DataFrame, summary: pd.DataFrame) -> go.Figure:
    """Mean normalised attention entropy per layer over training steps, and the final layer's mean predictive
    entropy (right axis)."""
    per_layer = heads.groupby(["layer", "step"])["norm_entropy"].mean().reset_index()
    lines = [go.Scatter(x=g["step"], y=g["norm_entropy"], mode="lines+markers", name=f"attention, layer {layer}")
             for layer, g in per_layer.groupby("layer")]
    lines.append(go.Scatter(x=summary["step"], y=summary["mean_predictive_entropy"], mode="lines+markers",
                            name="predictive entropy (final layer)", yaxis="y2", line=dict(dash="dash", width=3)))
    return go.Figure(lines, layout=dict(
        title="Entropy over training", height=420, margin=_MARGIN, xaxis_title="training step",
        yaxis=dict(title="normalised attention entropy", range=[0, 1]),
        yaxis2=dict(title="predictive entropy (nats)", overlaying="y", side="right", showgrid=False)))


def entropy_figures(result: Result, step: int | None = None) -> dict[str, go.Figure]:
    heads = result.table
    step = int(heads["step"].max()) if step is None else step
    return {"attention": attention_entropy_heatmap(heads, step),
            "predictive": predictive_entropy_heatmap(result.extra["predictive"], result.extra["tokens"], step),
            "training": entropy_over_training(heads, result.extra["over_training"])}


FIGURES["entropy"] = entropy_figures


# ----------------------------------------------------------------------------------------------------------
# Information plane
# ----------------------------------------------------------------------------------------------------------
def info_plane(table: pd.DataFrame, estimator: str = "renyi") -> go.Figure:
    """I(X; T) against I(T; Y): one trajectory per layer over the training steps, markers coloured by step."""
    sub = table[table["estimator"] == estimator].sort_values(["layer", "step"])
    traces = []
    for layer, g in sub.groupby("layer"):
        traces.append(go.Scatter(
            x=g["i_xt"], y=g["i_ty"], mode="lines+markers", name=f"layer {layer}", line=dict(width=1),
            marker=dict(size=9, color=g["step"], colorscale="Viridis", colorbar=dict(title="step", x=1.12),
                        showscale=bool(layer == sub["layer"].min())),
            customdata=g[["step", "entropy"]].to_numpy(),
            hovertemplate=f"layer {layer}<br>step %{{customdata[0]}}<br>I(X;T) %{{x:.3f}} bits<br>"
                          "I(T;Y) %{y:.3f} bits<br>S(T) %{customdata[1]:.3f} bits<extra></extra>"))
    name = {"renyi": "matrix-based Rényi", "dse": "diffusion spectral"}[estimator]
    return go.Figure(traces, layout=dict(title=f"Information plane ({name} estimates)", height=480, margin=_MARGIN,
                                         xaxis_title="I(X; T) bits", yaxis_title="I(T; Y) bits"))


def info_plane_figures(result: Result, estimator: str = "renyi") -> dict[str, go.Figure]:
    return {"plane": info_plane(result.table, estimator)}


FIGURES["infoplane"] = info_plane_figures


# ----------------------------------------------------------------------------------------------------------
# Concepts: probes, bottleneck, interventions, TCAV, atlas
# ----------------------------------------------------------------------------------------------------------
def probe_accuracy(table: pd.DataFrame) -> go.Figure:
    """Held-out probe accuracy by layer per concept (solid), the control task (dotted) and chance (grey)."""
    traces = []
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (concept, g) in enumerate(table.groupby("concept", sort=False)):
        c = palette[i % len(palette)]
        g = g.sort_values("layer")
        traces.append(go.Scatter(x=g["layer"], y=g["accuracy"], mode="lines+markers", name=concept,
                                 line=dict(color=c), legendgroup=concept,
                                 customdata=g[["control_accuracy", "selectivity"]].to_numpy(),
                                 hovertemplate=f"{concept}<br>layer %{{x}}<br>accuracy %{{y:.3f}}<br>control "
                                               "%{customdata[0]:.3f}<br>selectivity %{customdata[1]:.3f}"
                                               "<extra></extra>"))
        traces.append(go.Scatter(x=g["layer"], y=g["control_accuracy"], mode="lines", name=f"{concept} control",
                                 line=dict(color=c, dash="dot"), legendgroup=concept, showlegend=False,
                                 hovertemplate=f"{concept} control task<br>layer %{{x}}<br>%{{y:.3f}}<extra></extra>"))
    return go.Figure(traces, layout=dict(title="Probe accuracy by layer (dotted: control task, shuffled labels)",
                                         height=420, margin=_MARGIN, xaxis_title="layer (-1: embedding)",
                                         yaxis=dict(title="held-out accuracy", range=[0, 1.02])))


def probe_figures(result: Result) -> dict[str, go.Figure]:
    return {"accuracy": probe_accuracy(result.table)}


FIGURES["probes"] = probe_figures


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


def bottleneck_figures(result: Result) -> dict[str, go.Figure]:
    return {"weights": bottleneck_weights(result.table), "heads": bottleneck_summary(result.extra["summary"])}


FIGURES["bottleneck"] = bottleneck_figures


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


def intervention_figures(result: Result) -> dict[str, go.Figure]:
    return {"dose_response": dose_response(result.table, result.extra["groups"], result.meta.get("toward", ""))}


FIGURES["intervention"] = intervention_figures


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


def tcav_figures(result: Result) -> dict[str, go.Figure]:
    m = result.meta
    return {"tcav": tcav_scores(result.table, result.extra["draws"], f"{m.get('concept')}={m.get('value')}")}


FIGURES["tcav"] = tcav_figures


def atlas_scatter(table: pd.DataFrame, colour: str | None = None) -> go.Figure:
    """The 2-d map, one trace per class of the colouring concept; hover shows the token and its text."""
    colour = colour if colour in table.columns else None
    groups = table.groupby(colour, sort=True) if colour else [("points", table)]
    traces = []
    for value, g in groups:
        traces.append(go.Scattergl(x=g["x"], y=g["y"], mode="markers", name=str(value), marker=dict(size=4),
                                   customdata=np.stack([g["token"].astype(str), g["text"].astype(str)], 1),
                                   hovertemplate="%{customdata[0]}<br>%{customdata[1]}<extra>" + str(value) +
                                                 "</extra>"))
    return go.Figure(traces, layout=dict(title=f"Activation atlas ({len(table):,} points)" +
                                         (f", coloured by {colour}" if colour else ""), height=560, margin=_MARGIN,
                                         xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False)))


def atlas_figures(result: Result, colour: str | None = None) -> dict[str, go.Figure]:
    labels = [c for c in result.table.columns if c not in ("x", "y", "text_index", "position", "text", "token")]
    return {"atlas": atlas_scatter(result.table, colour or (labels[0] if labels else None))}


FIGURES["atlas"] = atlas_figures


# ----------------------------------------------------------------------------------------------------------
# Quantization sensitivity
# ----------------------------------------------------------------------------------------------------------
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


def quant_figures(result: Result, fmt: str | None = None) -> dict[str, go.Figure]:
    t = result.table
    kinds = [k for k in ("layer", "type", "matrix", "activation") if (t["unit_kind"] == k).any()]
    figs = {f"heatmap_{k}": quant_heatmap(t, k) for k in kinds[:2]}
    corr = result.extra["correlation"]
    if len(corr):
        figs["predicted_vs_measured"] = quant_scatter(result.extra["omega"], corr, fmt or corr["format"].iloc[0])
    return figs


FIGURES["quant_sensitivity"] = quant_figures


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


FIGURES["quant_allocation"] = allocation_figures
