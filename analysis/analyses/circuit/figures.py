"""Circuit figures: the pruned graph (layers up), faithfulness and completeness curves, each gradient method
against edge activation patching; and the EAP-IG library's graph JSON."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kernels.circuits import EdgeGraph, on_paths, on_paths_by_position, reader_owners

from ...plots import MARGIN
from ...result import Result
from ...stats import pearson
from .spec import FEATURE_NODE, METHOD_NAMES, SITE_OF_PREFIX

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"


def graph_of(meta: dict) -> EdgeGraph:
    g = meta["graph"]
    return EdgeGraph(int(g["n_layers"]), int(g["n_heads"]), int(g["n_kv_heads"]), bool(g["parallel_attn_mlp"]))


def circuit_edges(table: pd.DataFrame, meta: dict, method: str, n_edges: int) -> pd.DataFrame:
    """The method's top `n_edges` edges by |score|, kept where they lie on a path from the input to the logits
    (what the faithfulness curve measures), strongest first. Edges by position are pruned by position."""
    graph = graph_of(meta)
    sub = table[table["method"] == method].dropna(subset=["score"])
    top = sub.reindex(sub["score"].abs().sort_values(ascending=False, kind="stable").index).head(n_edges)
    if not by_position(meta):
        keep = _mask(graph, top)
        kept = on_paths(graph, keep)
        names = {(graph.sources[u], graph.targets[d]) for u, d in kept.nonzero().tolist()}
    else:
        import torch

        keep = torch.zeros(int(meta["n_tokens"]), *graph.mask.shape, dtype=torch.bool)
        for s, t in zip(top["source"], top["target"]):
            (u, p), (d, _) = split_position(s), split_position(t)
            keep[p, graph.source_index[u], graph.target_index[d]] = True
        kept = on_paths_by_position(graph, keep)
        names = {(f"{graph.sources[u]}@{p}", _at(graph.targets[d], p)) for p, u, d in kept.nonzero().tolist()}
    return top[[(s, t) in names for s, t in zip(top["source"], top["target"])]]


def by_position(meta: dict) -> bool:
    return meta.get("positions") == "each"


def split_position(name: str) -> tuple[str, int]:
    """'a3.h1<q>@5' -> ('a3.h1<q>', 5); a name without a position (the logits) -> (name, -1)."""
    base, at, p = name.rpartition("@")
    return (base, int(p)) if at else (name, -1)


def _at(name: str, p: int) -> str:
    return name if name == "logits" else f"{name}@{p}"


def _mask(graph: EdgeGraph, edges: pd.DataFrame):
    import torch

    keep = torch.zeros_like(graph.mask)
    for s, t in zip(edges["source"], edges["target"]):
        keep[graph.source_index[s], graph.target_index[t]] = True
    return keep


def node_of_target(graph: EdgeGraph, target: str) -> str:
    """The node a reader belongs to in the drawing: a head's q/k/v input its head (a shared key/value head of a
    grouped-query model its own node), an MLP's input the MLP, the logits the logits; by position at its position
    (`a3.h1<k>@5` -> `a3.h1@5`)."""
    base, p = split_position(target)
    if p >= 0:
        return _at(node_of_target(graph, base), p)
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


def graph_figure(table: pd.DataFrame, meta: dict, method: str, n_edges: int, pinned: str = "",
                 groups: list | None = None, tokens: list[str] | None = None) -> go.Figure:
    """The circuit of `method`'s top `n_edges` edges as a layered graph: edge width by |score|, colour by sign,
    node size by the |score| of its kept edges; hover gives each edge's score and interval. A pinned node's edges
    are drawn on top, the others faded; each group of nodes (`groups`: [(name, members)]) is outlined and named.
    Edges by position: positions across (a column of the layer's heads per position, `tokens` under them)."""
    graph = graph_of(meta)
    edges = circuit_edges(table, meta, method, n_edges)
    pos = _node_xy(graph, meta)
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
    each = by_position(meta)
    shown = sorted(set(weight) | ({"logits"} if each else {"input", "logits"}), key=lambda k: (pos[k][1], pos[k][0]))
    top = max(weight.values(), default=1.0)
    fig.add_trace(go.Scatter(
        x=[pos[k][0] for k in shown], y=[pos[k][1] for k in shown], mode="markers+text", text=shown,
        textposition="top center", customdata=[[weight.get(k, 0.0)] for k in shown],
        marker=dict(size=[10 + 22 * weight.get(k, 0.0) / top for k in shown],
                    color=["#f4a582" if k == pinned else "#d9d9d9" for k in shown], line=dict(width=1, color="#444")),
        hovertemplate="%{text}<br>|score| of its edges: %{customdata[0]:.4g}<extra>node</extra>", showlegend=False))
    draw_groups(fig, groups or [], {k: pos[k] for k in shown})
    xaxis = dict(visible=False)
    if each:  # the prompt's tokens under their columns
        P, width = int(meta["n_tokens"]), graph.n_heads + 1
        ticks = [str(t) for t in tokens] if tokens is not None and len(tokens) == P else [""] * P
        xaxis = dict(tickmode="array", tickvals=[p * width + (graph.n_heads - 1) / 2 for p in range(P)],
                     ticktext=[f"{t}<br>{p}" for p, t in enumerate(ticks)], showgrid=False, zeroline=False,
                     range=[-0.8, P * width - 0.2])  # every position's column, edges or none
    return fig.update_layout(dict(
        title=f"{METHOD_NAMES.get(method, method)}: {len(edges)} of the top {n_edges} edges"
              f"{' by position' if each else ''} on a path input → logits",
        height=max(420, 70 * graph.n_layers + 160), margin=MARGIN, xaxis=xaxis, yaxis=dict(visible=False)))


def _node_xy(graph: EdgeGraph, meta: dict):
    """Node -> (x, y) of the drawing; by position (`a3.h1@5`) the layer's row in the position's column, the logits
    above the last position."""
    pos = _positions(graph)
    if not by_position(meta):
        return pos
    width, last = graph.n_heads + 1, int(meta["n_tokens"]) - 1

    class At(dict):
        def __missing__(self, name):
            base, p = split_position(name)
            x, y = pos[base]
            self[name] = (x + width * (last if base == "logits" else p), y)
            return self[name]
    return At()


def faithfulness_figure(faith: pd.DataFrame, completeness: pd.DataFrame) -> go.Figure:
    """Faithfulness (solid) and completeness (dotted) against the number of edges (or nodes, for feature
    circuits), a line and a 95% band per method."""
    fig = go.Figure()
    colors = {"eap": "#1b9e77", "eap_ig": "#d95f02", "relp": "#7570b3", "activation": "#444444"}
    unit = "n_nodes" if "n_nodes" in faith.columns else "n_edges"
    what = unit[2:]
    for method, f in faith.groupby("method", sort=False):
        c = colors.get(method, "#666")
        x = np.maximum(f[unit], 0.8)  # the empty circuit at the left edge of a log axis
        fig.add_trace(go.Scatter(x=list(x) + list(x[::-1]), y=list(f["ci_high"]) + list(f["ci_low"][::-1]),
                                 fill="toself", fillcolor=c, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                 showlegend=False))
        kept = "n_edges_kept" in f.columns
        fig.add_trace(go.Scatter(x=x, y=f["faithfulness"], mode="lines+markers", name=METHOD_NAMES.get(method, method),
                                 line=dict(color=c), customdata=f[["n_edges_kept"]] if kept else None,
                                 hovertemplate=("top %{x} edges (%{customdata[0]} on paths): %{y:.3f}<extra></extra>"
                                                if kept else f"top %{{x}} {what}: %{{y:.3f}}<extra></extra>")))
        comp = completeness[completeness["method"] == method]
        fig.add_trace(go.Scatter(x=np.maximum(comp[unit], 0.8), y=comp["completeness"], mode="lines",
                                 line=dict(color=c, dash="dot"), name=f"{method}: model without the circuit",
                                 hovertemplate=f"without the top %{{x}} {what}: %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=0.8, line=dict(color="#999", dash="dash", width=1))
    return fig.update_layout(dict(title="Faithfulness of each method's circuits (dotted: completeness)",
                                      xaxis=dict(title=f"{what} kept (top n by |score|)", type="log"),
                                      yaxis=dict(title="fraction of the clean − corrupted metric"),
                                      height=420, margin=MARGIN))


def comparison_figure(table: pd.DataFrame, method: str) -> go.Figure:
    truth = table[table["method"] == "activation"].set_index(["source", "target"])["score"]
    est = table[table["method"] == method].set_index(["source", "target"])["score"]
    return _against_patching(truth, est, method, "edge", lambda index: [f"{s}->{t}" for s, t in index])


def _against_patching(truth: pd.Series, est: pd.Series, method: str, what: str, names) -> go.Figure:
    """Each item's `method` score against its activation-patching effect, with Pearson r and the diagonal."""
    both = pd.concat([truth.rename("a"), est.rename("m")], axis=1, join="inner").dropna()
    r = pearson(both["a"], both["m"]) if len(both) > 2 else float("nan")
    fig = go.Figure(go.Scattergl(x=both["a"], y=both["m"], mode="markers", text=names(both.index),
                                 marker=dict(size=4),
                                 hovertemplate="%{text}<br>patched %{x:.4g} · estimate %{y:.4g}<extra></extra>"))
    bound = float(np.nanmax(np.abs(both.to_numpy()))) if len(both) else 1.0
    fig.add_trace(go.Scatter(x=[-bound, bound], y=[-bound, bound], mode="lines", line=dict(dash="dot", color="#999"),
                             showlegend=False, hoverinfo="skip"))
    return fig.update_layout(dict(title=f"{METHOD_NAMES.get(method, method)} against {what} activation patching "
                                            f"(Pearson r = {r:.3f}, {len(both):,} {what}s)",
                                      xaxis=dict(title=f"{what} activation patching"), yaxis=dict(title=method),
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
    if meta.get("level") == "features":
        return feature_figures(result)
    methods = [m for m in dict.fromkeys(t["method"]) if m != "activation"] or ["activation"]
    method = methods[0] if "eap_ig" not in methods else "eap_ig"
    figs = {"graph": graph_figure(t, meta, method, default_edges(result, method), tokens=prompt_tokens(result))}
    if "faithfulness" in result.extra and len(result.extra["faithfulness"]):
        figs["faithfulness"] = faithfulness_figure(result.extra["faithfulness"], result.extra["completeness"])
    if "activation" in set(t["method"]) and method != "activation":
        figs["comparison"] = comparison_figure(t, method)
    return figs


def prompt_tokens(result: Result) -> list[str] | None:
    tokens = result.extra.get("tokens")
    return [str(t) for t in tokens["token"]] if tokens is not None else None


MAX_DRAWN_EDGES = 2000  # the most edges a graph draws (the page's slider ends there)


def default_edges(result: Result, method: str) -> int:
    """The edge count a graph opens on: the smallest circuit of the method's curve that reaches 80% faithfulness
    (else 50 edges), at most MAX_DRAWN_EDGES (a curve that reaches 80% only with a large graph's every edge would
    draw a million)."""
    n = result.meta.get(f"edges_for_80_{method}")
    return min(int(n) if n else min(50, int(result.meta.get("n_edges", 50))), MAX_DRAWN_EDGES)


# ----------------------------------------------------------------------------------------------------------
# Groups of nodes (supernodes): named in the link, outlined in the graph, their edges summed
# ----------------------------------------------------------------------------------------------------------
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,39}")
GROUP_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
MAX_GROUPS = 16


def parse_groups(text: str) -> list[tuple[str, list[str]]]:
    """'name: node + node; other: node' -> [(name, [nodes])], in order; a node in two groups, a name given twice or
    not of letters, digits, spaces and _ . - (up to 40), and an empty group are refused (ValueError)."""
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        name, sep, rest = part.partition(":")
        name = name.strip()
        if not sep or not GROUP_NAME.fullmatch(name):
            raise ValueError(f"{part[:60]!r} is not 'name: node + node' (a name of letters, digits, spaces and "
                             "_ . -, up to 40)")
        members = [m.strip() for m in rest.split("+") if m.strip()]
        if not members:
            raise ValueError(f"the group {name!r} has no nodes")
        if name in {n for n, _ in out}:
            raise ValueError(f"the group name {name!r} is given twice")
        twice = [m for m in members if m in seen]
        if twice:
            raise ValueError(f"{twice[0]!r} is in two groups")
        seen |= set(members)
        out.append((name, list(dict.fromkeys(members))))
    if len(out) > MAX_GROUPS:
        raise ValueError(f"{len(out)} groups; at most {MAX_GROUPS}")
    return out


def format_groups(groups: list[tuple[str, list[str]]]) -> str:
    return "; ".join(f"{name}: {' + '.join(members)}" for name, members in groups)


def draw_groups(fig: go.Figure, groups: list[tuple[str, list[str]]], xy: dict) -> None:
    """Each group's members (those drawn) outlined together and the group named above them."""
    for i, (name, members) in enumerate(groups):
        pts = [xy[m] for m in members if m in xy]
        if not pts:
            continue
        c = GROUP_COLORS[i % len(GROUP_COLORS)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs) - 0.3, max(xs) + 0.3, min(ys) - 0.3, max(ys) + 0.3
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line=dict(color=c, width=2, dash="dot"),
                      fillcolor=c, opacity=0.15, layer="below")
        fig.add_annotation(x=x0, y=y1, text=f"<b>{name}</b>", showarrow=False, xanchor="left", yanchor="bottom",
                           font=dict(color=c))


def group_edges(edges: pd.DataFrame, groups: list[tuple[str, list[str]]], node_of=lambda n: n) -> pd.DataFrame:
    """The shown edges with each group's members taken together: source and target (a group's name or a node not
    in any group), the edges between them and their summed score; edges inside a group are left out. Only rows
    that touch a group."""
    member = {m: name for name, ms in groups for m in ms}
    if not member or not len(edges):
        return pd.DataFrame(columns=["source", "target", "edges", "score"])
    src = [member.get(s, s) for s in edges["source"]]
    dst = [member.get(node_of(t), node_of(t)) for t in edges["target"]]
    df = pd.DataFrame({"source": src, "target": dst, "score": edges["score"].to_numpy()})
    named = set(member.values())
    df = df[(df["source"] != df["target"]) & (df["source"].isin(named) | df["target"].isin(named))]
    out = df.groupby(["source", "target"], sort=False).agg(edges=("score", "size"), score=("score", "sum"))
    return out.reset_index().reindex(columns=["source", "target", "edges", "score"]).sort_values(
        "score", key=abs, ascending=False, ignore_index=True)


# ----------------------------------------------------------------------------------------------------------
# Feature circuits
# ----------------------------------------------------------------------------------------------------------
SITE_KEY = {"attn_out": -2 / 3, "mlp_out": -1 / 3, "resid_post": 0.0}  # a site's row key: its block plus this


def node_site(name: str) -> tuple[str, int, int, int]:
    """(site, block, feature, position) of a feature circuit's node: site "input" (block -1) or "logits", feature -1
    for an error node or the input."""
    if name == "logits":
        return ("logits", 10**6, -1, -1)
    head, pos = name.rsplit("@", 1)
    if head == "input":
        return ("input", -1, -1, int(pos))
    m = re.fullmatch(FEATURE_NODE, head)
    if m is None:
        raise ValueError(f"{name!r} is not a feature circuit's node")
    if m["fs"]:
        return (SITE_OF_PREFIX[m["fs"]], int(m["fl"]), int(m["feature"]), int(pos))
    return (SITE_OF_PREFIX[m["es"]], int(m["el"]), -1, int(pos))


def site_key(site: str, layer: int) -> float:
    """A site's place in the model's order (and its row): the block, less 2/3 for its attention output and 1/3 for
    its MLP output; -1 the input."""
    return -1.0 if site == "input" else float(10**6) if site == "logits" else layer + SITE_KEY[site]


def node_parts(name: str) -> tuple[float, int, int]:
    """(the site's key in the model's order: the block for a residual, -1 for the input, 10**6 for the logits;
    feature, -1 for an error or input; position)."""
    site, layer, feat, pos = node_site(name)
    return (site_key(site, layer), feat, pos)


def feature_sites(meta: dict) -> list[tuple[str, int]]:
    """The SAE sites of a feature circuit's result, in the model's order (results before sublayer SAEs: the
    residual layers)."""
    return [tuple(x) for x in meta.get("sae_sites") or [("resid_post", la) for la in meta["sae_layers"]]]


def feature_edges(table: pd.DataFrame, method: str, n_edges: int) -> pd.DataFrame:
    """The method's top `n_edges` edges by |score|, strongest first."""
    sub = table[table["method"] == method].dropna(subset=["score"])
    return sub.reindex(sub["score"].abs().sort_values(ascending=False, kind="stable").index).head(n_edges)


def feature_graph_figure(result: Result, method: str, n_edges: int, pinned: str = "",
                         groups: list | None = None) -> go.Figure:
    """The feature circuit of `method`'s top `n_edges` edges: layers up (the input at the bottom, the logits on
    top), positions across with the prompt's tokens under them; node size by |node score|, edge width by |score|,
    colour by sign; hover gives each node's and edge's score and interval. A pinned node's edges are drawn on top,
    the others faded."""
    meta = result.meta
    edges = feature_edges(result.table, method, n_edges)
    nodes = result.extra["nodes"]
    nodes = nodes[nodes["method"] == method].set_index("node")
    sites = feature_sites(meta)
    rows = [-1.0] + [site_key(*site) for site in sites]
    row = {key: i for i, key in enumerate(rows)}
    P = int(meta["n_tokens"])
    names = sorted(set(edges["source"]) | set(edges["target"]) - {"logits"}, key=node_parts)
    # nodes sharing a layer and position spread across the position's column
    slot: dict[tuple[int, int], list[str]] = {}
    for name in names:
        layer, _, p = node_parts(name)
        slot.setdefault((layer, p), []).append(name)
    xy = {}
    for (layer, p), group in slot.items():
        for i, name in enumerate(group):
            xy[name] = (p + (i - (len(group) - 1) / 2) * min(0.8 / max(len(group), 1), 0.18), float(row[layer]))
    xy["logits"] = (P - 1, float(len(rows)))
    peak = float(edges["score"].abs().max()) if len(edges) else 1.0
    fig = go.Figure()
    mids = {"x": [], "y": [], "text": [], "color": []}
    for r in edges.itertuples():
        (x0, y0), (x1, y1) = xy[r.source], xy[r.target]
        on = not pinned or pinned in (r.source, r.target)
        color = POSITIVE if r.score >= 0 else NEGATIVE
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 opacity=0.85 if on else 0.12, line=dict(width=0.5 + 6 * abs(r.score) / peak,
                                                                         color=color)))
        ci = f" [{r.ci_low:.3g}, {r.ci_high:.3g}]" if np.isfinite(r.ci_low) else ""
        mids["x"].append((x0 + x1) / 2)
        mids["y"].append((y0 + y1) / 2)
        mids["text"].append(f"{r.source}->{r.target}<br>{r.score:.4g}{ci}")
        mids["color"].append(color)
    fig.add_trace(go.Scatter(x=mids["x"], y=mids["y"], mode="markers", text=mids["text"], showlegend=False,
                             marker=dict(size=6, color=mids["color"], opacity=0.5),
                             hovertemplate="%{text}<extra>edge</extra>"))
    shown = names + ["logits"]
    score = [float(nodes["score"].get(n, np.nan)) if n != "logits" else np.nan for n in shown]
    top = max((abs(v) for v in score if np.isfinite(v)), default=1.0) or 1.0
    text = []
    for n, v in zip(shown, score):
        if n == "logits":
            text.append("logits")
            continue
        r = nodes.loc[n]
        ci = f" [{r['ci_low']:.3g}, {r['ci_high']:.3g}]" if np.isfinite(r["ci_low"]) else ""
        text.append(f"{n} ({r['token']!s})<br>node effect {v:.4g}{ci}")
    fig.add_trace(go.Scatter(
        x=[xy[n][0] for n in shown], y=[xy[n][1] for n in shown], mode="markers", text=text,
        marker=dict(size=[8 + 20 * abs(v) / top if np.isfinite(v) else 14 for v in score],
                    color=["#f4a582" if n == pinned else (POSITIVE if v >= 0 else NEGATIVE) if np.isfinite(v)
                           else "#d9d9d9" for n, v in zip(shown, score)],
                    symbol=["square" if node_site(n)[2] < 0 and not n.startswith("input") and n != "logits" else
                            "diamond" if n.startswith("input") else "circle" for n in shown],
                    line=dict(width=1, color="#444"), opacity=0.9),
        hovertemplate="%{text}<extra>node</extra>", showlegend=False))
    draw_groups(fig, groups or [], xy)
    tokens = result.extra.get("tokens")
    ticks = [str(t) for t in tokens["token"]] if tokens is not None else [str(p) for p in range(P)]
    label = {"resid_post": "resid {}", "attn_out": "attn {}", "mlp_out": "mlp {}"}
    return fig.update_layout(dict(
        title=f"{METHOD_NAMES.get(method, method)}: the top {len(edges)} edges between features (squares: SAE "
              "errors, diamonds: the input)", height=max(420, 80 * len(rows) + 160), margin=MARGIN,
        xaxis=dict(tickmode="array", tickvals=list(range(P)), ticktext=[f"{t}<br>{p}" for p, t in enumerate(ticks)],
                   range=[-0.6, P - 0.4]),
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows) + 1)),
                   ticktext=["input"] + [label[kind].format(la) for kind, la in sites] + ["logits"])))


def node_comparison_figure(result: Result, method: str) -> go.Figure:
    """Each node's `method` score against its activation-patching effect."""
    n = result.extra["nodes"]
    truth = n[n["method"] == "activation"].set_index("node")["score"]
    est = n[n["method"] == method].set_index("node")["score"]
    return _against_patching(truth, est, method, "node", list)


def default_feature_edges(result: Result, method: str) -> int:
    return int(min(40, max(1, (result.table["method"] == method).sum())))


def feature_figures(result: Result) -> dict:
    t = result.table
    methods = list(dict.fromkeys(t["method"])) or ["eap"]
    method = "eap_ig" if "eap_ig" in methods else methods[0]
    figs = {"graph": feature_graph_figure(result, method, default_feature_edges(result, method))}
    if len(result.extra.get("faithfulness", [])):
        figs["faithfulness"] = faithfulness_figure(result.extra["faithfulness"], result.extra["completeness"])
    if "activation" in set(result.extra["nodes"]["method"]):
        figs["comparison"] = node_comparison_figure(result, method)
    return figs


def _logit_node(meta: dict, n_layers: int, P: int, clerp: str) -> dict:
    answer = int(meta.get("answer_id", -1))
    return {"node_id": f"{n_layers + 1}_{answer}_{P - 1}", "feature": answer, "layer": str(n_layers + 1),
            "ctx_idx": P - 1, "feature_type": "logit", "token_prob": 0.0, "is_target_logit": True, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": f"L_{answer}-{P - 1}", "clerp": clerp}


def _neuronpedia(slug: str, model_name: str, layers: list[str], tokens: pd.DataFrame, nodes: list[dict],
                 links: list[dict], supernodes: list[list[str]]) -> str:
    """Neuronpedia's attribution-graph JSON around its nodes and links: metadata and qParams (the groups as its
    supernodes: [name, node ids…])."""
    return json.dumps({"metadata": {"slug": slug, "scan": model_name or "workbench", "transcoder_list": layers,
                                    "prompt_tokens": [str(t) for t in tokens["token"]],
                                    "prompt": "".join(map(str, tokens["token"])), "node_threshold": None,
                                    "schema_version": 1},
                       "qParams": {"pinnedIds": [], "linkType": "both", "clickedId": "", "sg_pos": "",
                                   "supernodes": [sn for sn in supernodes if len(sn) > 1]},
                       "nodes": nodes, "links": links})


def neuronpedia_json(result: Result, method: str, n_edges: int, model_name: str = "",
                     groups: list | None = None) -> str:
    """The feature circuit of `method`'s top `n_edges` edges in Neuronpedia's attribution-graph JSON (the format
    circuit-tracer writes and Neuronpedia's graph viewer reads): metadata, qParams, nodes and links. Node ids follow
    it: `{layer}_{feature}_{position}` for a feature, `{layer}_-1_{position}` for an SAE's error node (the viewer's
    "reconstruction error"), `E_{token id}_{position}` for an input token and `{n_layers + 1}_{token id}_{last}`
    for the answer's logit; `feature_type` takes the viewer's vocabulary. With SAEs at attention or MLP outputs
    too, `layer` is the site's row in the model's order (0 the first SAE's site; `transcoder_list` names each row's
    SAE) and the logit's the row after the last; each node's `clerp` is its name here."""
    meta = result.meta
    edges = feature_edges(result.table, method, n_edges)
    nodes = result.extra["nodes"]
    nodes = nodes[nodes["method"] == method].set_index("node")
    tokens = result.extra["tokens"]
    ids = [int(t) for t in tokens["token_id"]]
    P = len(ids)
    sites = feature_sites(meta)
    by_row = any(kind != "resid_post" for kind, _ in sites)
    row = {site: i for i, site in enumerate(sites)}
    n_layers = (len(sites) - 1 if by_row else
                int((meta.get("model_summary") or {}).get("n_layers") or (max(meta["sae_layers"]) + 1)))
    logit = _logit_node(meta, n_layers, P, f"the metric: {meta['metric']}")

    def parts(name: str) -> tuple[str, int, int]:  # (layer label, feature, position); label "E" for the input
        site, layer, feat, p = node_site(name)
        if site == "input":
            return "E", feat, p
        return str(row[(site, layer)] if by_row else layer), feat, p

    def node_id(name: str) -> str:
        if name == "logits":
            return logit["node_id"]
        label, feat, p = parts(name)
        return f"E_{ids[p]}_{p}" if label == "E" else f"{label}_{feat}_{p}"

    out_nodes = []
    drawn = set(edges["source"]) | set(edges["target"])
    for name in sorted(drawn, key=node_parts):
        if name == "logits":
            out_nodes.append(logit)
            continue
        label, feat, p = parts(name)
        r = nodes.loc[name]
        if label == "E":
            kind, js = "embedding", f"E_{ids[p]}-{p}"
        elif feat < 0:
            kind, js = "mlp reconstruction error", f"{label}_-1-{p}"
        else:
            kind, js = "cross layer transcoder", f"{label}_{feat}-0"
        out_nodes.append({"node_id": node_id(name), "feature": feat if feat >= 0 else (p if label == "E" else -1),
                          "layer": label, "ctx_idx": p, "feature_type": kind,
                          "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                          "jsNodeId": js, "clerp": name if by_row else "", "influence": float(abs(r["score"])),
                          "activation": None})
    links = [{"source": node_id(r.source), "target": node_id(r.target), "weight": float(r.score)}
             for r in edges.itertuples()]
    listed = ([f"{i}: {kind} SAE, block {la}" for i, (kind, la) in enumerate(sites)] if by_row else
              [f"resid_post SAE, layer {la}" for _, la in sites])
    return _neuronpedia(f"workbench-circuit-{method}", model_name, listed, tokens, out_nodes, links,
                        [[name, *[node_id(m) for m in ms if m in drawn]] for name, ms in groups or []])


def component_neuronpedia_json(result: Result, method: str, n_edges: int, model_name: str = "",
                               groups: list | None = None) -> str:
    """A component circuit by position (the EAP-IG library's graph JSON has no positions) in Neuronpedia's
    attribution-graph JSON: the circuit of `method`'s top `n_edges` edges on paths input -> logits, a node per
    drawn (component, position). The viewer has no head or MLP type, so they are its feature nodes, named by their
    `clerp` (`a3.h1@5`): ids `{layer}_{head}_{position}`, `{layer}_{n_heads}_{position}` for the MLP and
    `{layer}_{n_heads + 1 + g}_{position}` for key/value head g of a grouped-query model; `E_{token id}_{position}`
    the input and `{n_layers + 1}_{answer id}_{last}` the logits. An edge into a head's q, k or v at p links to
    the head at p; edges meeting the same two nodes are one link, their scores summed."""
    meta = result.meta
    graph = graph_of(meta)
    edges = circuit_edges(result.table, meta, method, n_edges)
    tokens = result.extra["tokens"]
    ids = [int(t) for t in tokens["token_id"]]
    P, H = len(ids), graph.n_heads
    logit = _logit_node(meta, graph.n_layers, P, f"logits: the metric {meta['metric']}")

    def node_id(name: str) -> str:
        if name == "logits":
            return logit["node_id"]
        base, p = split_position(name)
        if base == "input":
            return f"E_{ids[p]}_{p}"
        if base.startswith("m"):
            return f"{base[1:]}_{H}_{p}"
        layer, head = base[1:].split(".")
        index = int(head[1:]) if head.startswith("h") else H + 1 + int(head[2:])
        return f"{layer}_{index}_{p}"

    links: dict[tuple[str, str], float] = {}
    influence: dict[str, float] = {}
    for r in edges.itertuples():
        a, b = r.source, node_of_target(graph, r.target)
        key = (node_id(a), node_id(b))
        links[key] = links.get(key, 0.0) + float(r.score)
        for n in (a, b):
            influence[n] = influence.get(n, 0.0) + abs(float(r.score))
    out_nodes = []
    pos = _node_xy(graph, meta)
    for name in sorted(influence, key=lambda k: (pos[k][1], pos[k][0])):
        if name == "logits":
            out_nodes.append(logit)
            continue
        base, p = split_position(name)
        nid = node_id(name)
        layer, index = ("E", ids[p]) if base == "input" else tuple(nid.split("_")[:2])
        out_nodes.append({"node_id": nid, "feature": int(index), "layer": str(layer), "ctx_idx": p,
                          "feature_type": "embedding" if base == "input" else "cross layer transcoder",
                          "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                          "jsNodeId": f"{layer}_{index}-{p}" if base != "input" else f"E_{ids[p]}-{p}",
                          "clerp": name, "influence": influence[name], "activation": None})
    return _neuronpedia(f"workbench-circuit-{method}-by-position", model_name,
                        [f"components of block {layer}" for layer in range(graph.n_layers)], tokens, out_nodes,
                        [{"source": a, "target": b, "weight": w} for (a, b), w in links.items()],
                        [[name, *[node_id(m) for m in ms if m in influence]] for name, ms in groups or []])


# ----------------------------------------------------------------------------------------------------------
# Interventions
# ----------------------------------------------------------------------------------------------------------
def per_pair_metric(metric: str) -> str:
    """What a pair's own value of the metric is: the normalised logit difference is normalised on means over
    pairs, so each pair's value is the raw logit difference."""
    return "logit difference" if metric.startswith("logit_diff") else metric


def intervention_metric_figure(result: Result) -> go.Figure:
    """Per pair: the metric of the clean and the corrupted run, and of the chosen prompts before and after the
    intervention."""
    t, meta = result.table, result.meta
    fig = go.Figure()
    x = [f"pair {p}" for p in t["pair"]]
    for col, name, color in (("clean", "clean run", "#999999"), ("corrupted", "corrupted run", "#dddddd"),
                             ("before", f"{meta['prompts']} prompts", "#6baed6"),
                             ("after", "with the nodes set", POSITIVE)):
        fig.add_bar(x=x, y=t[col], name=name, marker_color=color,
                    hovertemplate=f"{name}: %{{y:.3f}}<extra>%{{x}}</extra>")
    nodes = meta["nodes"]
    shown = ", ".join(nodes[:6]) + (f" and {len(nodes) - 6} more" if len(nodes) > 6 else "")
    what = per_pair_metric(meta["metric"])
    fig.update_layout(barmode="group", title=f"{what}: {shown} set to {meta['value']}",
                      yaxis_title=what, margin=MARGIN, legend_orientation="h", legend_y=-0.15)
    return fig


def intervention_next_token_figure(result: Result, pair: int = 0) -> go.Figure:
    """One pair's next-token distribution before and after the intervention (the other prompt's for reference)."""
    nt = result.extra["next_token"]
    sub = nt[nt["pair"] == pair].sort_values("p_before", ascending=False)
    labels = [f"{tok!r}" + (" (answer)" if a else " (wrong)" if w else "")
              for tok, a, w in zip(sub["token"], sub["answer"], sub["wrong"])]
    fig = go.Figure()
    for col, name, color in (("p_before", "before", "#6baed6"), ("p_after", "after", POSITIVE),
                             ("p_other", "the other prompt", "#cccccc")):
        fig.add_bar(x=labels, y=sub[col], name=name, marker_color=color,
                    hovertemplate=f"{name}: %{{y:.4f}}<extra>%{{x}}</extra>")
    fig.update_layout(barmode="group", title=f"Next token, pair {pair}", yaxis_title="probability",
                      margin=MARGIN, legend_orientation="h", legend_y=-0.25)
    return fig


def intervention_figures(result: Result) -> dict:
    return {"metric": intervention_metric_figure(result), "next_token": intervention_next_token_figure(result)}
