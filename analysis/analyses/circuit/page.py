"""The Circuits page: edges between components scored by activation patching, EAP, EAP-IG and RelP on prompt
pairs; each method's circuit as a layered graph with a slider for its size and a pinned node; faithfulness curves;
the graph in the EAP-IG library's JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ...contract import Page, ViewState, Widget
from ...specs import Spec
from ...untrusted import md_escape
from ..patching.page import EXAMPLE_PAIRS
from ..patching.spec import pairs_with_text
from .figures import (
    MAX_DRAWN_EDGES,
    by_position,
    circuit_edges,
    comparison_figure,
    component_neuronpedia_json,
    default_edges,
    default_feature_edges,
    eap_ig_json,
    faithfulness_figure,
    feature_edges,
    feature_graph_figure,
    feature_sites,
    format_groups,
    graph_figure,
    graph_of,
    group_edges,
    intervention_metric_figure,
    intervention_next_token_figure,
    neuronpedia_json,
    node_comparison_figure,
    node_of_target,
    node_parts,
    parse_groups,
    per_pair_metric,
    prompt_tokens,
    split_position,
)
from .intervene import KINDS, CircuitInterventionSpec, parse_node
from .spec import LEVELS, METHOD_NAMES, CircuitSpec, sae_input, sae_specs

WIDGETS = {
    "dataset": Widget("Prompt pairs", "radio", labels={"ioi": "Shipped IOI pairs", "": "My pairs (JSON)"}),
    "n_pairs": Widget("IOI pairs"),
    "pairs": Widget("Pairs: clean / corrupted prompts (equal length within a pair), single-token answers",
                    "text_area", height=140),
    "methods": Widget(labels=METHOD_NAMES),
    "direction": Widget(labels={"denoise": "clean → corrupted", "noise": "corrupted → clean"}),
    "level": Widget("Nodes", "radio", labels={"components": "heads, MLPs, input, logits",
                                              "features": "SAE features and errors, by position"}),
    "layers": Widget("SAE layers (features; empty: every block)"),
    "sae_width": Widget("SAE width"),
    "sae_k": Widget("SAE k"),
    "sae_steps": Widget("SAE training steps"),
    "sae_max_tokens": Widget("SAE training tokens"),
    "edge_nodes": Widget("Nodes per method with edges"),
    "sublayers": Widget("SAEs also at each block's", labels={"attn_out": "attention output", "mlp_out": "MLP output"}),
    "sae_folders": Widget("SAE folders to load instead (SAELens format, one per line, a block's residual each; empty: "
                          "train them here)", "lines", height=68),
    "edge_ablation": Widget("Edges outside a circuit", labels={"corrupted": "corrupted run's value",
                                                               "mean": "mean over the other pairs"}),
    "positions": Widget("Edges", labels={"summed": "summed over positions", "each": "one per position (u@p → d@p)"}),
    "ablation": Widget("Nodes outside a circuit", labels={"mean": "at their mean", "corrupted": "corrupted value"}),
    "ig_steps": Widget("EAP-IG steps"),
    "n_points": Widget("Points on each faithfulness curve"),
    "patch_limit": Widget("Edges (features: nodes) activation patching runs on at most"),
    "relp_rules": Widget("RelP rules"),
}
LAYOUT = ["dataset", ("n_pairs", "ig_steps", "n_points"), "pairs", "methods", ("metric", "direction"),
          ("relp_rules", "patch_limit")]
COMPONENT_LAYOUT = [("edge_ablation", "positions")]
FEATURE_LAYOUT = [("layers", "sae_width", "sae_k", "sae_steps"), ("sae_max_tokens", "edge_nodes", "ablation"),
                  "sublayers", "sae_folders"]
SUBLAYER_NAMES = {"attn_out": "attention outputs", "mlp_out": "MLP outputs"}
IV_WIDGETS = {
    "prompts": Widget("Run", "radio", labels={"clean": "the clean prompts", "corrupted": "the corrupted prompts"}),
    "value": Widget("Set each chosen node to", "radio", labels={"other": "the other prompt's value (patch)",
                                                                "mean": "its mean (mean ablation)", "zero": "zero"}),
    "top_k": Widget("Next tokens shown"),
}
# the intervention's fields that are the circuit's own (the same pairs, metric and SAEs; the model's come from the
# sidebar), and those that are its own (the nodes and what they are set to)
SHARED = tuple(f for f in CircuitInterventionSpec.field_names()
               if f in CircuitSpec.field_names() and f not in Spec.field_names())
IV_FIELDS = tuple(f for f in CircuitInterventionSpec.field_names() if f not in CircuitSpec.field_names())


@dataclass(frozen=True)
class CircuitView(ViewState):
    view_method: str = ""
    n_edges: int = 0  # 0: the smallest circuit that reaches 80% faithfulness
    pinned: str = ""  # a node whose inputs and outputs are listed
    pair: int = 0  # the pair whose next-token distribution the intervention shows
    groups: str = ""  # named groups of nodes (supernodes): "name: node + node; other: node"


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Circuits",
                      "Which edges between heads and MLPs carry the behaviour, and how few still do the task? Edge "
                      "activation patching is the ground truth; EAP, EAP-IG and RelP estimate every edge from a few "
                      "passes. Each method's top edges are pruned to paths from the input to the logits and scored by "
                      "faithfulness: every other edge gets the corrupted run's value (or its mean over the other "
                      "pairs); edges can also be taken position by position. With SAE features as the nodes, an SAE "
                      "after each chosen block splits the residual into features and an error node per position (and, "
                      "if asked, SAEs at the blocks' attention and MLP outputs); nodes are scored the same ways, "
                      "edges join each site to the ones it reads directly, and circuits keep the top nodes with every "
                      "other node at its mean.")
    url, view = ctx.link(CircuitSpec), ctx.view(CircuitView)
    if url.pairs:
        url = dataclasses.replace(url, dataset="")
    # the level outside the form: the SAE settings show only for feature circuits
    level = st.radio(WIDGETS["level"].label, LEVELS, index=LEVELS.index(url.level), horizontal=True,
                     format_func=WIDGETS["level"].labels.get, key="circuit_level")
    with st.form("circuit"):
        values = ctx.spec_widgets(CircuitSpec, dataclasses.replace(url, pairs=url.pairs or EXAMPLE_PAIRS),
                                  LAYOUT + (FEATURE_LAYOUT if level == "features" else COMPONENT_LAYOUT), WIDGETS)
        ctx.run_button()
    values["level"] = level
    shipped = values["dataset"] == "ioi"
    values["pairs"] = "" if shipped else values["pairs"]
    make = lambda: ctx.make_spec(CircuitSpec, model, url, values)  # noqa: E731

    outcome = ctx.run(make, model)
    result = outcome.result
    table, meta = result.table, result.meta
    circuit_spec = make() if shipped else outcome.spec.replace(
        pairs=pairs_with_text(outcome.spec.pairs, values["pairs"]))
    if meta.get("level") == "features":
        figures, title, shown, options, start = _features(ctx, outcome, view)
        params, pair = _intervention(ctx, model, circuit_spec, options, start, view, figures,
                                     int(meta["n_tokens"]))
        ctx.share(outcome, {**ctx.spec_params(circuit_spec), **params}, figures, title,
                  view=dataclasses.replace(shown, pair=pair))
        return
    graph = graph_of(meta)
    each = by_position(meta)
    _captions(st, meta, f"{meta['n_edges']:,} edges between {meta['n_sources']} writers and {meta['n_targets']} "
                        "readers" + (f", by position ({meta['n_graph_edges']:,} at each of {meta['n_tokens']}; the "
                                     "logits read the last)" if each else ""), "edge")

    methods = list(dict.fromkeys(table["method"]))
    method, n_edges = _method_and_count(ctx, view, methods, lambda m: min(int(meta["n_edges"]), MAX_DRAWN_EDGES),
                                        lambda m: default_edges(result, m),
                                        "Edges kept (top n by |score|, then pruned to paths input → logits)")
    kept = circuit_edges(table, meta, method, n_edges)
    nodes = sorted(({"logits"} if each else {"input", "logits"}) | set(kept["source"])
                   | {node_of_target(graph, t) for t in kept["target"]}, key=_node_order)
    known = set(graph.sources) | {"logits"} | {node_of_target(graph, t) for t in graph.targets}
    if each:  # every node at every position
        known = {"logits"} | {f"{k}@{p}" for k in known - {"logits"} for p in range(int(meta["n_tokens"]))}
    pinned = _pin(ctx, view.pinned, nodes, known, "which is not in this circuit.",
                  "which is not a node of this model's graph.")
    groups, groups_text = _groups(ctx, view.groups, nodes, known)
    graph_fig = graph_figure(table, meta, method, n_edges, pinned, groups, prompt_tokens(result))
    st.plotly_chart(graph_fig, width="stretch")
    figures = {"graph": graph_fig}
    if pinned:
        _pinned_edges(st, pinned, kept[[node_of_target(graph, t) == pinned for t in kept["target"]]],
                      kept[kept["source"] == pinned])
    _group_table(st, group_edges(kept, groups, lambda t: node_of_target(graph, t)))

    _faithfulness(st, result, figures, "edges")
    if "activation" in methods and method != "activation":
        comp = comparison_figure(table, method)
        st.plotly_chart(comp, width="stretch")
        figures["comparison"] = comp
    st.caption(meta["statistics"])
    st.subheader("Edges of the circuit")
    st.dataframe(kept.drop(columns=["method"]), hide_index=True, width="stretch")
    if each:  # the EAP-IG library's graph has no positions
        st.download_button("Download the graph (Neuronpedia attribution-graph JSON)",
                           component_neuronpedia_json(result, method, n_edges, outcome.spec.model, groups),
                           file_name=f"circuit-{method}-{n_edges}-by-position.json", mime="application/json")
    else:
        st.download_button("Download the graph (EAP-IG JSON)", eap_ig_json(table, meta, method, n_edges),
                           file_name=f"circuit-{method}-{n_edges}.json", mime="application/json")

    writers = list(graph.sources)
    is_writer = lambda n: split_position(n)[0] in writers  # noqa: E731
    start = [pinned] if pinned and is_writer(pinned) else [n for n in nodes if is_writer(n) and
                                                           split_position(n)[0] != "input"]
    options = [n for n in nodes if is_writer(n) and n not in writers] + writers  # by position: the shown ones too
    params, pair = _intervention(ctx, model, circuit_spec, options, start, view, figures, int(meta["n_tokens"]))
    ctx.share(outcome, {**ctx.spec_params(circuit_spec), **params}, figures,
              f"Circuit: {METHOD_NAMES.get(method, method)}, {n_edges} edges",
              view=CircuitView(method, n_edges, pinned, pair, groups_text))


def _faithfulness(st, result, figures: dict, unit: str) -> None:
    """The faithfulness curves and how many edges (or nodes) each method needs for 80%."""
    faith = result.extra.get("faithfulness")
    if faith is None or not len(faith):
        return
    st.subheader("Faithfulness")
    ff = faithfulness_figure(faith, result.extra["completeness"])
    st.plotly_chart(ff, width="stretch")
    figures["faithfulness"] = ff
    st.caption(f"{unit.capitalize()} needed for 80% faithfulness: " + " · ".join(
        f"{m}: {result.meta.get(f'{unit}_for_80_{m}') or 'not reached'}" for m in dict.fromkeys(faith["method"])))


def _captions(st, meta: dict, graph: str, unit: str) -> None:
    st.caption(f"{meta['n_pairs']} pairs of {meta['n_tokens']} tokens · {meta['metric']} · clean "
               f"{meta['clean_metric']:.3f} · corrupted {meta['corrupted_metric']:.3f} · {graph}")
    if meta.get("pairs_note"):
        st.caption(f"Shipped IOI pairs for this model: {meta['pairs_note']}")
    if meta.get(f"patched_{unit}s"):
        st.caption(f"{unit.capitalize()} activation patching ran on {meta[f'patched_{unit}s']}.")


def _method_and_count(ctx, view: CircuitView, methods: list[str], top_of, default, label: str) -> tuple[str, int]:
    """The method shown and the edge count (the link's when it is in 1..top_of(method), else the method's default,
    with a warning for a link's count out of range)."""
    st = ctx.st
    c1, c2 = st.columns(2)
    method = ctx.choose(view, "view_method", "Show method", methods, slot=c1,
                        fallback="eap_ig" if "eap_ig" in methods else None,
                        format_func=lambda m: METHOD_NAMES.get(m, m))
    top = top_of(method)
    start = view.n_edges if 1 <= view.n_edges <= top else min(default(method), top)
    if view.n_edges and view.n_edges != start:
        st.warning(f"The link's edge count {view.n_edges} is outside 1 to {top}: showing {start}.")
    return method, (c2.slider(label, 1, top, start, key="n_edges") if top > 1 else 1)


def _pin(ctx, pinned: str, shown: list[str], known: set[str], hidden: str, unknown: str) -> str:
    """The pinned node: the link's when the graph shows it (else a warning saying why not), from a select box."""
    if pinned and pinned not in shown:
        ctx.st.warning(f"The link pins {pinned!r}, " + (hidden if pinned in known else unknown))
        pinned = ""
    return ctx.choose(CircuitView(pinned=pinned), "pinned", "Pin a node (its inputs and outputs below)",
                      [""] + shown, format_func=lambda k: k or "none")


def _groups(ctx, text: str, shown: list[str], known: set[str]) -> tuple[list, str]:
    """Named groups of nodes (supernodes) from the link's or the box's text: (groups, the text for the link). Text
    that does not parse, or names a node this graph does not have, gets a warning and is left out of the link;
    members not among the nodes shown stay in the group (a larger edge count may show them) and are said."""
    st = ctx.st
    typed = st.text_input("Group nodes (name: node + node; other: node)", value=text, key="groups",
                          help="Named groups are outlined in the graph and their edges summed below it; they are "
                               "part of the link and of the Neuronpedia export (its supernodes).")
    try:
        groups = parse_groups(typed)
    except ValueError as e:
        st.warning(f"The groups were not read: {e}.")
        return [], ""
    unknown = [m for _, ms in groups for m in ms if m not in known]
    if unknown:
        st.warning(f"The groups name {', '.join(map(repr, unknown[:5]))}, not nodes of this graph: groups left out.")
        return [], ""
    hidden = [m for _, ms in groups for m in ms if m not in shown]
    if hidden:
        st.caption(f"Not among the nodes shown (more edges may show them): {', '.join(hidden[:10])}.")
    return groups, format_groups(groups)


def _group_table(st, table) -> None:
    if len(table):
        st.markdown("**Edges of the groups** (summed over their members' edges shown)")
        st.dataframe(table, hide_index=True, width="stretch")


def _pinned_edges(st, pinned: str, into, out) -> None:
    a, b = st.columns(2)
    a.markdown(f"**Into {pinned}**")
    a.dataframe(into.drop(columns=["method"]), hide_index=True, width="stretch")
    b.markdown(f"**Out of {pinned}**")
    b.dataframe(out.drop(columns=["method"]), hide_index=True, width="stretch")


def feature_page_link(spec: CircuitSpec, layer: int, feature: int, site: str = "resid_post") -> str:
    """The Features page of one feature of the SAE a feature circuit split a site with (block `layer`'s residual,
    or its attention or MLP output; a link into this app; the sidebar's model stays)."""
    from ..features.page import feature_link
    from ..features.sae import SAESpec

    sae, defaults = sae_specs(spec, {})[sae_input((site, layer))], SAESpec()
    fields = {f: getattr(sae, f) for f in ("layer", "site", "width", "k", "steps", "max_tokens")
              if f == "layer" or getattr(sae, f) != getattr(defaults, f)}
    return feature_link(fields, feature)


def _features(ctx, outcome, view: CircuitView):
    """The feature circuit's page body: the graph with its edge count and pinned node, the nodes (feature nodes
    linked to their feature pages), the faithfulness curves and the comparison with node patching; the graph in
    Neuronpedia's JSON. Returns (figures, title, the view shown)."""
    st = ctx.st
    result = outcome.result
    table, meta, nodes = result.table, result.meta, result.extra["nodes"]
    subs = sorted({kind for kind, _ in feature_sites(meta)} - {"resid_post"})
    _captions(st, meta, f"SAEs after blocks {', '.join(map(str, meta['sae_layers']))}"
                        f"{' and at ' + ' and '.join(SUBLAYER_NAMES[x] for x in subs) if subs else ''} · "
                        f"{meta['n_nodes']:,} nodes "
                        f"that change · {meta['n_edges']:,} edges", "node")
    method, n_edges = _method_and_count(ctx, view, list(dict.fromkeys(table["method"])) or ["eap"],
                                        lambda m: max(1, min(int((table["method"] == m).sum()), MAX_DRAWN_EDGES)),
                                        lambda m: default_feature_edges(result, m), "Edges shown (top n by |score|)")
    kept = feature_edges(table, method, n_edges)
    shown = sorted(set(kept["source"]) | set(kept["target"]), key=node_parts)
    known = set(nodes["node"]) | {"logits"}
    pinned = _pin(ctx, view.pinned, shown, known, "which is not among the edges shown.",
                  "which is not a node of this circuit.")
    groups, groups_text = _groups(ctx, view.groups, shown, known)
    graph_fig = feature_graph_figure(result, method, n_edges, pinned, groups)
    st.plotly_chart(graph_fig, width="stretch")
    figures = {"graph": graph_fig}
    if pinned:
        _pinned_edges(st, pinned, kept[kept["target"] == pinned], kept[kept["source"] == pinned])
    _group_table(st, group_edges(kept, groups))
    st.subheader("Nodes of the graph")
    spec = outcome.spec
    in_graph = nodes[(nodes["method"] == method) & nodes["node"].isin(shown)].copy()
    if "site" not in in_graph.columns:  # results from before sublayer SAEs: residual sites only
        in_graph["site"] = np.where(in_graph["kind"] == "input", "input", "resid_post")
    in_graph["page"] = [feature_page_link(spec, int(r.layer), int(r.feature), r.site) if r.kind == "feature" else None
                        for r in in_graph.itertuples()]
    in_graph = in_graph.reindex(in_graph["score"].abs().sort_values(ascending=False).index)
    st.dataframe(in_graph[["page", "node", "token", "site", "kind", "score", "ci_low", "ci_high"]], hide_index=True,
                 width="stretch", column_config={"page": st.column_config.LinkColumn(
                     "feature page", display_text=r"feature=(\d+)")})
    _faithfulness(st, result, figures, "nodes")
    if "activation" in set(nodes["method"]):
        comp = node_comparison_figure(result, method)
        st.plotly_chart(comp, width="stretch")
        figures["comparison"] = comp
    st.caption(meta["statistics"])
    st.download_button("Download the graph (Neuronpedia attribution-graph JSON)",
                       neuronpedia_json(result, method, n_edges, outcome.spec.model, groups),
                       file_name=f"feature-circuit-{method}-{n_edges}.json", mime="application/json")
    ranked = nodes[nodes["method"] == method]
    ranked = ranked.reindex(ranked["score"].abs().sort_values(ascending=False).index)["node"].tolist()
    options = list(dict.fromkeys([n for n in shown if n != "logits"] + ranked[:200]))
    start = [pinned] if pinned and pinned != "logits" else [n for n in ranked if not n.startswith("input")][:5]
    return figures, f"Feature circuit: {METHOD_NAMES.get(method, method)}, {n_edges} edges", \
        CircuitView(method, n_edges, pinned, groups=groups_text), options, start


def _intervention(ctx, model, circuit_spec, options: list[str], start: list[str], view: CircuitView,
                  figures: dict, n_tokens: int) -> tuple[dict, int]:
    """Interventions from the graph: the chosen nodes set all at once on the circuit's pairs (of at most `n_tokens`
    tokens), the metric and the next-token distribution before and after. Returns the link's fields for it and the
    pair shown."""
    st = ctx.st
    level = circuit_spec.level
    st.subheader("Intervene on nodes")
    st.caption("The chosen nodes are set all at once on the circuit's prompt pairs (everything after them "
               "recomputed): to the pair's other prompt's value (patching), their mean over the prompts run, "
               "position by position (mean ablation), or zero. Nodes: the graph's names; @p for one position.")
    defaults = {"level": level, "nodes": tuple(start)}
    if ctx.query().get("level", level) == level:
        url = ctx.link(CircuitInterventionSpec, defaults=defaults)
    else:  # the circuit's link was refused (said above) and the page shows the defaults: not the link's nodes
        url = CircuitInterventionSpec(**defaults)
    chosen = list(start)
    if "nodes" in ctx.query():
        fits = [n for n in url.nodes if parse_node(n).kind in KINDS[level]]
        # a node the graph lacks (the graph names every component), or at a position past these prompts (another
        # model's tokenizer made the link's): another model's
        foreign = [n for n in fits if (level == "components" and n.split("@")[0] not in options)
                   or (parse_node(n).pos or 0) >= n_tokens]
        if foreign:
            st.warning(f"The link's nodes {', '.join(foreign[:5])} are not in this model's graph (its prompts have "
                       f"positions 0 to {n_tokens - 1}): left out.")
        fits = [n for n in fits if n not in foreign]
        if fits:
            chosen = fits
        elif ctx.query().get("level") == level:
            st.warning(f"The link names no {level} node of this model: starting from the circuit's.")
    widgets = {**IV_WIDGETS, "nodes": Widget("Nodes to set (all at once)", "multiselect", key="iv_nodes",
                                             options=tuple(dict.fromkeys([*chosen, *options])))}
    with st.form("circuit_intervention"):
        values = ctx.spec_widgets(CircuitInterventionSpec, url.replace(nodes=tuple(chosen), level=level),
                                  ["nodes", ("prompts", "value", "top_k")], widgets)
        ctx.run_button("Intervene")
    data = {**values, **{f: getattr(circuit_spec, f) for f in SHARED}}
    spec, outcome = ctx.run_part(lambda: ctx.make_spec(CircuitInterventionSpec, model, url, data), model)
    params = {k: v for k, v in ctx.spec_params(spec).items() if k in IV_FIELDS} if spec is not None else {}
    if outcome is None:
        return params, 0
    r = outcome.result
    meta, table = r.meta, r.table
    line = (f"{per_pair_metric(meta['metric'])}, mean over pairs, on the {meta['prompts']} prompts: "
            f"{meta['before']:.3f} → {meta['after']:.3f} "
            f"(change {meta['change']:+.3f}, 95% interval {meta['change_low']:+.3f} to {meta['change_high']:+.3f})")
    if "after_normalized" in meta:
        line += (f" · between the corrupted (0) and the clean run (1): {meta['before_normalized']:.2f} → "
                 f"{meta['after_normalized']:.2f} ({meta['after_normalized_low']:.2f} to "
                 f"{meta['after_normalized_high']:.2f})")
    st.markdown(md_escape(line))
    st.caption(f"KL(before ‖ after) at the final position: {meta['kl']:.4f} nats, mean over pairs · "
               f"{meta['statistics']}")
    fig = intervention_metric_figure(r)
    st.plotly_chart(fig, width="stretch")
    pair = ctx.choose(view, "pair", "Next-token distribution of pair", list(table["pair"]),
                      format_func=lambda i: f"{i}: {table['prompt'].iloc[i][-80:]}")
    nt = intervention_next_token_figure(r, int(pair))
    st.plotly_chart(nt, width="stretch")
    st.dataframe(table, hide_index=True, width="stretch")
    st.download_button("Download the intervention (CSV)", table.to_csv(index=False), file_name="intervention.csv",
                       mime="text/csv")
    figures.update({"intervention": fig, "intervention_next_token": nt})
    return params, int(pair)


def _node_order(name: str):
    base, p = split_position(name)
    if p >= 0:  # by position: position by position, each in the graph's order
        return (p, *_node_order(base))
    if name == "input":
        return (-1, 0, 0)
    if name == "logits":
        return (10**6, 0, 0)
    if name.startswith("m"):
        return (int(name[1:]), 2, 0)
    layer, rest = name[1:].split(".", 1)
    return (int(layer), 1 if rest.startswith("h") else 0, int(rest.lstrip("hkv")))


PAGE = Page(title="Circuits", render=render, url_path="circuits", icon=":material/account_tree:", order=11)
