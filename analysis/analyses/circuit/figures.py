"""Circuit figures: the pruned graph (layers up), faithfulness and completeness curves, each gradient method
against edge activation patching; and the EAP-IG library's graph JSON."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kernels.circuits import EdgeGraph, on_paths, reader_owners

from ...plots import MARGIN
from ...result import Result
from ...stats import pearson
from .spec import METHOD_NAMES

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"


def graph_of(meta: dict) -> EdgeGraph:
    g = meta["graph"]
    return EdgeGraph(int(g["n_layers"]), int(g["n_heads"]), int(g["n_kv_heads"]), bool(g["parallel_attn_mlp"]))


def circuit_edges(table: pd.DataFrame, meta: dict, method: str, n_edges: int) -> pd.DataFrame:
    """The method's top `n_edges` edges by |score|, kept where they lie on a path from the input to the logits
    (what the faithfulness curve measures), strongest first."""
    graph = graph_of(meta)
    sub = table[table["method"] == method].dropna(subset=["score"])
    top = sub.reindex(sub["score"].abs().sort_values(ascending=False, kind="stable").index).head(n_edges)
    keep = _mask(graph, top)
    kept = on_paths(graph, keep)
    names = {(graph.sources[u], graph.targets[d]) for u, d in kept.nonzero().tolist()}
    return top[[(s, t) in names for s, t in zip(top["source"], top["target"])]]


def _mask(graph: EdgeGraph, edges: pd.DataFrame):
    import torch

    keep = torch.zeros_like(graph.mask)
    for s, t in zip(edges["source"], edges["target"]):
        keep[graph.source_index[s], graph.target_index[t]] = True
    return keep


def node_of_target(graph: EdgeGraph, target: str) -> str:
    """The node a reader belongs to in the drawing: a head's q/k/v input its head (a shared key/value head of a
    grouped-query model its own node), an MLP's input the MLP, the logits the logits."""
    if "<" not in target:
        return target
    base, kind = target[:-1].split("<")
    if kind in ("k", "v") and graph.n_kv_heads != graph.n_heads:
        return f"{base.split('.h')[0]}.kv{base.split('.h')[1]}"
    return base


def _positions(graph: EdgeGraph) -> dict[str, tuple[float, float]]:
    """Node -> (x, y): the input at the bottom, each layer's heads in a row and its MLP above them, the logits
    on top; key/value heads of a grouped-query model between their query heads' row and the MLP."""
    H = graph.n_heads
    pos = {"input": ((H - 1) / 2, 0.0)}
    for layer in range(graph.n_layers):
        y = 1 + 2 * layer
        for h in range(H):
            pos[f"a{layer}.h{h}"] = (float(h), y)
        if graph.n_kv_heads != H:
            group = H // graph.n_kv_heads
            for g in range(graph.n_kv_heads):
                pos[f"a{layer}.kv{g}"] = (g * group + (group - 1) / 2, y - 0.45)
        pos[f"m{layer}"] = ((H - 1) / 2, y + 1)
    pos["logits"] = ((H - 1) / 2, 1.0 + 2 * graph.n_layers)
    return pos


def graph_figure(table: pd.DataFrame, meta: dict, method: str, n_edges: int, pinned: str = "") -> go.Figure:
    """The circuit of `method`'s top `n_edges` edges as a layered graph: edge width by |score|, colour by sign,
    node size by the |score| of its kept edges; hover gives each edge's score and interval. A pinned node's edges
    are drawn on top, the others faded."""
    graph = graph_of(meta)
    edges = circuit_edges(table, meta, method, n_edges)
    pos = _positions(graph)
    peak = float(edges["score"].abs().max()) if len(edges) else 1.0
    fig = go.Figure()
    weight: dict[str, float] = {}
    mids_x, mids_y, mids_text, mids_color = [], [], [], []
    for r in edges.itertuples():
        a, b = r.source, node_of_target(graph, r.target)
        weight[a] = weight.get(a, 0.0) + abs(r.score)
        weight[b] = weight.get(b, 0.0) + abs(r.score)
        (x0, y0), (x1, y1) = pos[a], pos[b]
        on = not pinned or pinned in (a, b)
        color = POSITIVE if r.score >= 0 else NEGATIVE
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 opacity=0.85 if on else 0.12,
                                 line=dict(width=0.5 + 6 * abs(r.score) / peak, color=color)))
        mids_x.append((x0 + x1) / 2)
        mids_y.append((y0 + y1) / 2)
        ci = f" [{r.ci_low:.3g}, {r.ci_high:.3g}]" if np.isfinite(r.ci_low) else ""
        mids_text.append(f"{r.source}->{r.target}<br>{r.score:.4g}{ci}")
        mids_color.append(color)
    fig.add_trace(go.Scatter(x=mids_x, y=mids_y, mode="markers", marker=dict(size=6, color=mids_color, opacity=0.5),
                             text=mids_text, hovertemplate="%{text}<extra>edge</extra>", showlegend=False))
    shown = sorted(set(weight) | {"input", "logits"}, key=lambda k: (pos[k][1], pos[k][0]))
    top = max(weight.values(), default=1.0)
    fig.add_trace(go.Scatter(
        x=[pos[k][0] for k in shown], y=[pos[k][1] for k in shown], mode="markers+text", text=shown,
        textposition="top center", customdata=[[weight.get(k, 0.0)] for k in shown],
        marker=dict(size=[10 + 22 * weight.get(k, 0.0) / top for k in shown],
                    color=["#f4a582" if k == pinned else "#d9d9d9" for k in shown], line=dict(width=1, color="#444")),
        hovertemplate="%{text}<br>|score| of its edges: %{customdata[0]:.4g}<extra>node</extra>", showlegend=False))
    return go.Figure(fig, layout=dict(
        title=f"{METHOD_NAMES.get(method, method)}: {len(edges)} of the top {n_edges} edges on a path "
              "input → logits", height=max(420, 70 * graph.n_layers + 160), margin=MARGIN,
        xaxis=dict(visible=False), yaxis=dict(visible=False)))


def faithfulness_figure(faith: pd.DataFrame, completeness: pd.DataFrame) -> go.Figure:
    """Faithfulness (solid) and completeness (dotted) against the number of edges, a line and a 95% band per
    method."""
    fig = go.Figure()
    colors = {"eap": "#1b9e77", "eap_ig": "#d95f02", "relp": "#7570b3", "activation": "#444444"}
    for method, f in faith.groupby("method", sort=False):
        c = colors.get(method, "#666")
        x = np.maximum(f["n_edges"], 0.8)  # the empty circuit at the left edge of a log axis
        fig.add_trace(go.Scatter(x=list(x) + list(x[::-1]), y=list(f["ci_high"]) + list(f["ci_low"][::-1]),
                                 fill="toself", fillcolor=c, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=f["faithfulness"], mode="lines+markers", name=METHOD_NAMES.get(method, method),
                                 line=dict(color=c), customdata=f[["n_edges_kept"]],
                                 hovertemplate="top %{x} edges (%{customdata[0]} on paths): %{y:.3f}<extra></extra>"))
        comp = completeness[completeness["method"] == method]
        fig.add_trace(go.Scatter(x=np.maximum(comp["n_edges"], 0.8), y=comp["completeness"], mode="lines",
                                 line=dict(color=c, dash="dot"), name=f"{method}: model without the circuit",
                                 hovertemplate="without the top %{x} edges: %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.8, line=dict(color="#999", dash="dash", width=1))
    return go.Figure(fig, layout=dict(title="Faithfulness of each method's circuits (dotted: completeness)",
                                      xaxis=dict(title="edges kept (top n by |score|)", type="log"),
                                      yaxis=dict(title="fraction of the clean − corrupted metric"),
                                      height=420, margin=MARGIN))


def comparison_figure(table: pd.DataFrame, method: str) -> go.Figure:
    truth = table[table["method"] == "activation"].set_index(["source", "target"])["score"]
    est = table[table["method"] == method].set_index(["source", "target"])["score"]
    both = pd.concat([truth.rename("a"), est.rename("m")], axis=1, join="inner").dropna()
    r = pearson(both["a"], both["m"]) if len(both) > 2 else float("nan")
    names = [f"{s}->{t}" for s, t in both.index]
    fig = go.Figure(go.Scattergl(x=both["a"], y=both["m"], mode="markers", text=names, marker=dict(size=4),
                                 hovertemplate="%{text}<br>patched %{x:.4g} · estimate %{y:.4g}<extra></extra>"))
    bound = float(np.nanmax(np.abs(both.to_numpy()))) if len(both) else 1.0
    fig.add_trace(go.Scatter(x=[-bound, bound], y=[-bound, bound], mode="lines", line=dict(dash="dot", color="#999"),
                             showlegend=False, hoverinfo="skip"))
    return go.Figure(fig, layout=dict(title=f"{METHOD_NAMES.get(method, method)} against edge activation patching "
                                            f"(Pearson r = {r:.3f}, {len(both):,} edges)",
                                      xaxis=dict(title="edge activation patching"), yaxis=dict(title=method),
                                      height=420, margin=MARGIN, showlegend=False))


def eap_ig_json(table: pd.DataFrame, meta: dict, method: str, n_edges: int, d_model: int | None = None) -> str:
    """The graph in the EAP-IG library's JSON (`Graph.to_json`, read by `Graph.from_json`): cfg, nodes with
    in_graph, edges with score and in_graph, for `method`'s circuit of its top `n_edges` edges."""
    graph = graph_of(meta)
    kept = circuit_edges(table, meta, method, n_edges)
    in_graph = set(zip(kept["source"], kept["target"]))
    scores = table[table["method"] == method].set_index(["source", "target"])["score"]
    nodes_in = {"input", "logits"} | set(kept["source"]) | {node_of_target(graph, t) for t in kept["target"]}
    owners = reader_owners(graph)
    for j, t in enumerate(graph.targets):  # a shared key/value reader puts its query heads in the graph
        if any((s, t) in in_graph for s in graph.sources):
            nodes_in |= {graph.sources[o] for o in owners[j]}
    nodes = {name: {"in_graph": name in nodes_in} for name in graph.sources + ["logits"]}
    edges = {f"{s}->{t}": {"score": float(scores.get((s, t), float("nan"))), "in_graph": (s, t) in in_graph}
             for s, t in ((graph.sources[u], graph.targets[d]) for u, d in graph.edges)}
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel}
    d_model = d_model or (meta.get("model_summary") or {}).get("d_model")
    if d_model:  # the library's reader sizes its neuron masks by it
        cfg["d_model"] = int(d_model)
    return json.dumps({"cfg": cfg, "nodes": nodes, "edges": edges})


def figures(result: Result) -> dict:
    t, meta = result.table, result.meta
    methods = [m for m in dict.fromkeys(t["method"]) if m != "activation"] or ["activation"]
    method = methods[0] if "eap_ig" not in methods else "eap_ig"
    figs = {"graph": graph_figure(t, meta, method, default_edges(result, method))}
    if "faithfulness" in result.extra and len(result.extra["faithfulness"]):
        figs["faithfulness"] = faithfulness_figure(result.extra["faithfulness"], result.extra["completeness"])
    if "activation" in set(t["method"]) and method != "activation":
        figs["comparison"] = comparison_figure(t, method)
    return figs


def default_edges(result: Result, method: str) -> int:
    """The edge count a graph opens on: the smallest circuit of the method's curve that reaches 80% faithfulness
    (else 50 edges)."""
    n = result.meta.get(f"edges_for_80_{method}")
    return int(n) if n else min(50, int(result.meta.get("n_edges", 50)))
