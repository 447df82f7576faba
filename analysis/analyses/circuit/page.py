"""The Circuits page: edges between components scored by activation patching, EAP, EAP-IG and RelP on prompt
pairs; each method's circuit as a layered graph with a slider for its size and a pinned node; faithfulness curves;
the graph in the EAP-IG library's JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...contract import Page, ViewState, Widget
from ..patching.page import EXAMPLE_PAIRS
from ..patching.spec import pairs_with_text
from .figures import (
    circuit_edges,
    comparison_figure,
    default_edges,
    eap_ig_json,
    faithfulness_figure,
    graph_figure,
    graph_of,
    node_of_target,
)
from .spec import METHOD_NAMES, CircuitSpec

WIDGETS = {
    "dataset": Widget("Prompt pairs", "radio", labels={"ioi": "Shipped IOI pairs", "": "My pairs (JSON)"}),
    "n_pairs": Widget("IOI pairs"),
    "pairs": Widget("Pairs: clean / corrupted prompts (equal length within a pair), single-token answers",
                    "text_area", height=140),
    "methods": Widget(labels=METHOD_NAMES),
    "direction": Widget(labels={"denoise": "clean → corrupted", "noise": "corrupted → clean"}),
    "level": Widget("Nodes", "radio", labels={"components": "heads, MLPs, input, logits"}),
    "ig_steps": Widget("EAP-IG steps"),
    "n_points": Widget("Points on each faithfulness curve"),
    "patch_limit": Widget("Edges activation patching runs on at most"),
    "relp_rules": Widget("RelP rules"),
}
LAYOUT = ["dataset", ("n_pairs", "ig_steps", "n_points"), "pairs", "level", "methods", ("metric", "direction"),
          ("relp_rules", "patch_limit")]


@dataclass(frozen=True)
class CircuitView(ViewState):
    view_method: str = ""
    n_edges: int = 0  # 0: the smallest circuit that reaches 80% faithfulness
    pinned: str = ""  # a node whose inputs and outputs are listed


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Circuits",
                      "Which edges between heads and MLPs carry the behaviour, and how few still do the task? Edge "
                      "activation patching is the ground truth; EAP, EAP-IG and RelP estimate every edge from a "
                      "few passes. Each method's top edges are pruned to paths from the input to the logits and "
                      "scored by faithfulness: every other edge gets the corrupted run's value.")
    url, view = ctx.link(CircuitSpec), ctx.view(CircuitView)
    if url.pairs:
        url = dataclasses.replace(url, dataset="")
    with st.form("circuit"):
        values = ctx.spec_widgets(CircuitSpec, dataclasses.replace(url, pairs=url.pairs or EXAMPLE_PAIRS), LAYOUT,
                                  WIDGETS)
        ctx.run_button()
    shipped = values["dataset"] == "ioi"
    values["pairs"] = "" if shipped else values["pairs"]
    make = lambda: ctx.make_spec(CircuitSpec, model, url, values)  # noqa: E731

    outcome = ctx.run(make, model)
    result = outcome.result
    table, meta = result.table, result.meta
    graph = graph_of(meta)
    st.caption(f"{meta['n_pairs']} pairs of {meta['n_tokens']} tokens · {meta['metric']} · clean "
               f"{meta['clean_metric']:.3f} · corrupted {meta['corrupted_metric']:.3f} · {meta['n_edges']:,} edges "
               f"between {meta['n_sources']} writers and {meta['n_targets']} readers")
    if meta.get("pairs_note"):
        st.caption(f"Shipped IOI pairs for this model: {meta['pairs_note']}")
    if meta.get("patched_edges"):
        st.caption(f"Edge activation patching ran on {meta['patched_edges']}.")

    methods = list(dict.fromkeys(table["method"]))
    c1, c2 = st.columns(2)
    method = ctx.choose(view, "view_method", "Show method", methods, slot=c1,
                        fallback="eap_ig" if "eap_ig" in methods else None,
                        format_func=lambda m: METHOD_NAMES.get(m, m))
    top = min(int(meta["n_edges"]), 2000)
    start = view.n_edges if 1 <= view.n_edges <= top else min(default_edges(result, method), top)
    if view.n_edges and view.n_edges != start:
        st.warning(f"The link's edge count {view.n_edges} is outside 1 to {top}: showing {start}.")
    n_edges = c2.slider("Edges kept (top n by |score|, then pruned to paths input → logits)", 1, top, start,
                        key="n_edges")
    kept = circuit_edges(table, meta, method, n_edges)
    nodes = sorted({"input", "logits"} | set(kept["source"]) | {node_of_target(graph, t) for t in kept["target"]},
                   key=_node_order)
    pinned = view.pinned
    if pinned and pinned not in nodes:
        known = set(graph.sources) | {"logits"} | {node_of_target(graph, t) for t in graph.targets}
        st.warning(f"The link pins {pinned!r}, " + ("which is not in this circuit." if pinned in known else
                                                     "which is not a node of this model's graph."))
        pinned = ""
    pinned = ctx.choose(CircuitView(pinned=pinned), "pinned", "Pin a node (its inputs and outputs below)",
                        [""] + nodes, format_func=lambda k: k or "none")
    graph_fig = graph_figure(table, meta, method, n_edges, pinned)
    st.plotly_chart(graph_fig, width="stretch")
    figures = {"graph": graph_fig}
    if pinned:
        into = kept[[node_of_target(graph, t) == pinned for t in kept["target"]]]
        out = kept[kept["source"] == pinned]
        a, b = st.columns(2)
        a.markdown(f"**Into {pinned}**")
        a.dataframe(into.drop(columns=["method"]), hide_index=True, width="stretch")
        b.markdown(f"**Out of {pinned}**")
        b.dataframe(out.drop(columns=["method"]), hide_index=True, width="stretch")

    faith = result.extra.get("faithfulness")
    if faith is not None and len(faith):
        st.subheader("Faithfulness")
        ff = faithfulness_figure(faith, result.extra["completeness"])
        st.plotly_chart(ff, width="stretch")
        figures["faithfulness"] = ff
        reach = {m: meta.get(f"edges_for_80_{m}") for m in methods}
        st.caption("Edges needed for 80% faithfulness: " + " · ".join(
            f"{m}: {n if n else 'not reached'}" for m, n in reach.items()))
    if "activation" in methods and method != "activation":
        comp = comparison_figure(table, method)
        st.plotly_chart(comp, width="stretch")
        figures["comparison"] = comp
    st.caption(meta["statistics"])
    st.subheader("Edges of the circuit")
    st.dataframe(kept.drop(columns=["method"]), hide_index=True, width="stretch")
    st.download_button("Download the graph (EAP-IG JSON)", eap_ig_json(table, meta, method, n_edges),
                       file_name=f"circuit-{method}-{n_edges}.json", mime="application/json")

    ctx.share(outcome, ctx.spec_params(make() if shipped else outcome.spec.replace(
        pairs=pairs_with_text(outcome.spec.pairs, values["pairs"]))), figures,
              f"Circuit: {METHOD_NAMES.get(method, method)}, {n_edges} edges",
              view=CircuitView(method, n_edges, pinned))


def _node_order(name: str):
    if name == "input":
        return (-1, 0, 0)
    if name == "logits":
        return (10**6, 0, 0)
    if name.startswith("m"):
        return (int(name[1:]), 2, 0)
    layer, rest = name[1:].split(".", 1)
    return (int(layer), 1 if rest.startswith("h") else 0, int(rest.lstrip("hkv")))


PAGE = Page(title="Circuits", render=render, url_path="circuits", icon=":material/account_tree:", order=11)
