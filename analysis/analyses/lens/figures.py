"""Lens figures: the layer x position heatmap and KL by layer."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ...plots import MARGIN as _MARGIN
from ...plots import token_labels
from ...result import Result

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
    return go.Figure(heat, layout=dict(title=f"{lens.capitalize()} lens · {site} · {title}",
                                       height=max(300, 34 * n_layers),
                                       margin=_MARGIN, xaxis=dict(tickangle=-60), yaxis=dict(autorange="reversed")))


def lens_kl_by_layer(table: pd.DataFrame, by_layer: pd.DataFrame | None = None) -> go.Figure:
    """Mean KL from the final distribution per layer, one line per site (and per lens, when there are several),
    with its 95% bootstrap interval over positions as a band when the run has it (`by_layer`)."""
    group = ["lens", "site"] if "lens" in table else ["site"]
    lines = []
    for key, g in table.groupby(group, sort=False):
        name = " · ".join(key) if isinstance(key, tuple) else str(key)
        if by_layer is not None:
            b = by_layer[(by_layer["lens"] == key[0]) & (by_layer["site"] == key[1])]
            x = b["layer"].to_numpy()
            lines.append(go.Scatter(x=[*x, *x[::-1]], y=[*b["kl_high"], *b["kl_low"][::-1]], fill="toself",
                                    line=dict(width=0), opacity=0.2, hoverinfo="skip", showlegend=False,
                                    name=f"{name} 95% interval"))
            lines.append(go.Scatter(x=x, y=b["kl_mean"], mode="lines+markers", name=name,
                                    customdata=b[["kl_low", "kl_high", "n_positions"]].to_numpy(),
                                    hovertemplate="layer %{x}: %{y:.3f} nats (95% interval %{customdata[0]:.3f}–"
                                                  "%{customdata[1]:.3f}, %{customdata[2]} positions)<extra></extra>"))
            continue
        m = g.groupby("layer")["kl_to_final"].mean()
        lines.append(go.Scatter(x=m.index.to_numpy(), y=m.to_numpy(), mode="lines+markers", name=name))
    title = "KL from the model's final distribution, mean over positions" + (
        " (band: 95% bootstrap interval over positions)" if by_layer is not None else "")
    return go.Figure(lines, layout=dict(title=title, height=360, margin=_MARGIN, xaxis_title="layer",
                                        yaxis_title="nats"))


def figures(result: Result, site: str | None = None, colour: str = "final_prob",
                 lens: str | None = None) -> dict[str, go.Figure]:
    t = result.table
    site = site or ("resid_post" if (t["site"] == "resid_post").any() else t["site"].iloc[0])
    lens = lens or t["lens"].iloc[0]
    return {"lens": lens_heatmap(t, result.extra["tokens"], site, colour, lens),
            "kl": lens_kl_by_layer(t, result.extra.get("by_layer"))}
