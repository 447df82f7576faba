"""Patching page: activation, attribution and relevance patching over prompt pairs, side by side, with a
faithfulness report. Everything runs through the pipeline (spec -> store or compute) and lives in the URL."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.analyses.patching.figures import comparison_scatter, patching_heatmap
from analysis.analyses.patching.spec import COMPONENTS, DIRECTIONS, METHODS, METRICS, PatchingSpec
from views.common import require_model, run_or_stop, share_and_export, spec_from_link, spec_params

EXAMPLE_PAIRS = """[
  {"clean": "Then, John and Mary went to the store. John gave a ring to",
   "corrupted": "Then, Adam and Lucy went to the store. Nora gave a ring to",
   "answer": " Mary", "wrong": " John"}
]"""
FIELDS = ("dataset", "n_pairs", "pairs", "components", "methods", "relp_rules", "metric", "direction", "overlap_k")

st.title("Patching")
st.caption("Which components carry the behaviour? Activation patching is the ground truth; attribution (AtP) and "
           "relevance patching (RelP) estimate it from 2 forwards and 1 backward.")
model = require_model()
qp, url = spec_from_link(PatchingSpec, FIELDS)

with st.form("patching"):
    source = st.radio("Prompt pairs", ["Shipped IOI pairs", "My pairs (JSON)"], horizontal=True,
                      index=1 if url.pairs else 0)
    c1, c2 = st.columns(2)
    n_pairs = c1.number_input("IOI pairs", 1, 256, url.n_pairs)
    pairs_text = st.text_area("Pairs: clean / corrupted prompts of equal token length, single-token answers",
                              value=url.pairs or EXAMPLE_PAIRS, height=140)
    components = st.multiselect("Components", COMPONENTS, default=list(url.components))
    methods = st.multiselect("Methods", METHODS, default=list(url.methods),
                             format_func={"activation": "activation patching", "atp": "attribution patching (AtP)",
                                          "relp": "relevance patching (RelP)",
                                          "ig": "integrated gradients (Captum)"}.get)
    c3, c4, c5 = st.columns(3)
    metric = c3.selectbox("Metric", METRICS, index=METRICS.index(url.metric))
    direction = c4.selectbox("Direction", DIRECTIONS, index=DIRECTIONS.index(url.direction),
                             format_func={"denoise": "clean → corrupted", "noise": "corrupted → clean"}.get)
    ah_rule = c5.checkbox("RelP: AH rule on attention", value="attention" in url.relp_rules,
                          help="No gradient through the softmax: q, k and pattern scores become unavailable.")
    st.form_submit_button("Run")


def make_spec() -> PatchingSpec:
    return PatchingSpec(
        model=model.model, revision=model.revision, dtype=model.dtype,
        dataset="" if source.startswith("My") else "ioi", n_pairs=int(n_pairs),
        pairs=pairs_text if source.startswith("My") else "", components=tuple(components), methods=tuple(methods),
        relp_rules=("ln", "identity", "half") + (("attention",) if ah_rule else ()), metric=metric,
        direction=direction, overlap_k=url.overlap_k)


outcome = run_or_stop(make_spec, model)
spec = outcome.spec
result = outcome.result
table, tokens, meta = result.table, result.extra["tokens"], result.meta
st.caption(f"{meta['n_pairs']} pairs of {meta['n_tokens']} tokens · {meta['metric']} · clean {meta['clean_metric']:.3f}"
           f" · corrupted {meta['corrupted_metric']:.3f}")

done_methods = list(dict.fromkeys(table["method"]))
done_components = list(dict.fromkeys(table["component"]))
v1, v2 = st.columns(2)
view_method = v1.selectbox("Show method", done_methods,
                           index=done_methods.index(qp.get("view_method")) if qp.get("view_method") in done_methods
                           else 0, key="view_method")
view_component = v2.selectbox("Show component", done_components,
                              index=done_components.index(qp.get("view_component"))
                              if qp.get("view_component") in done_components else 0, key="view_component")
heat = patching_heatmap(table, tokens, view_method, view_component, meta["metric"])
st.plotly_chart(heat, width="stretch")
figures = {"heatmap": heat}

if "faithfulness" in result.extra:
    st.subheader("Faithfulness: each estimator against activation patching")
    st.dataframe(result.extra["faithfulness"], hide_index=True, width="stretch")
    if view_method != "activation":
        scatter = comparison_scatter(table, view_method, view_component)
        st.plotly_chart(scatter, width="stretch")
        figures["comparison"] = scatter

st.subheader("Top components")
sub = table[(table["method"] == view_method) & (table["component"] == view_component)].dropna(subset=["value"])
top = sub.reindex(sub["value"].abs().sort_values(ascending=False).index).head(20)
labels = dict(zip(tokens["pos"], tokens["token"]))
top = top.assign(token=[repr(labels.get(int(p), "")) if pd.notna(p) else "" for p in top["pos"]])
st.dataframe(top.drop(columns=["method"]), hide_index=True, width="stretch")

share_and_export(outcome, {**spec_params(outcome.spec if source.startswith("My") else make_spec()),
                           "view_method": view_method, "view_component": view_component},
                 figures, f"Patching: {', '.join(spec.components)}")
