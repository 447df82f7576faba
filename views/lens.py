"""Lens page: every layer's residual decoded as a next-token distribution (the logit lens), with entropy, KL from
the model's final distribution and the probability of chosen target tokens. Everything runs through the
pipeline (spec -> store or compute) and lives in the URL."""
from __future__ import annotations

import streamlit as st

from analysis.analyses.lens.figures import LENS_COLOURS, lens_heatmap, lens_kl_by_layer
from analysis.analyses.lens.spec import LENSES, SITES, LensSpec
from views.common import require_model, run_or_stop, share_and_export, spec_from_link, spec_params

DEFAULT_PROMPT = "The capital of France is"
FIELDS = ("prompt", "token_ids", "sites", "targets", "target_ids", "top_k", "lenses")

st.title("Lens")
st.caption("Each layer's residual through the final norm (recomputed on that residual) and the unembedding: "
           "where does the prediction form?")
model = require_model()
qp, url = spec_from_link(LensSpec, FIELDS, {"prompt": DEFAULT_PROMPT})

with st.form("lens"):
    prompt = st.text_area("Prompt", value=url.prompt, max_chars=20_000)
    c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
    targets_text = c1.text_input("Target tokens (comma-separated, with their leading spaces)",
                                 value=",".join(url.targets), help="Each must be one token, e.g. ' Paris'.")
    sites = c2.multiselect("Residual sites", SITES, default=list(url.sites))
    lenses = c3.multiselect("Lenses", LENSES, default=list(url.lenses),
                            help="The tuned lens is trained once per model (a few seconds on the default model) "
                                 "and stored; resid_mid has no tuned translator.")
    top_k = c4.number_input("Top-k", 1, 20, url.top_k)
    st.form_submit_button("Run")

targets = tuple(t for t in targets_text.split(",") if t.strip())
same_prompt = prompt == url.prompt
outcome = run_or_stop(lambda: LensSpec(
    model=model.model, revision=model.revision, dtype=model.dtype, prompt=prompt,
    token_ids=url.token_ids if same_prompt else (), sites=tuple(sites), targets=targets,
    target_ids=url.target_ids if targets == url.targets else (), top_k=int(top_k), lenses=tuple(lenses)), model)

result = outcome.result
table, tokens = result.table, result.extra["tokens"]
done_sites = result.meta["sites"]
done_lenses = list(dict.fromkeys(table["lens"]))
v0, v1, v2 = st.columns(3)
lens = v0.selectbox("Show lens", done_lenses, key="view_lens",
                    index=done_lenses.index(qp["view_lens"]) if qp.get("view_lens") in done_lenses else 0)
lens_sites = [s for s in done_sites if ((table["lens"] == lens) & (table["site"] == s)).any()]
site = v1.selectbox("Show site", lens_sites, key="view_site",
                    index=lens_sites.index(qp["view_site"]) if qp.get("view_site") in lens_sites else
                    (lens_sites.index("resid_post") if "resid_post" in lens_sites else 0))
colours = list(LENS_COLOURS)
colour = v2.selectbox("Colour by", colours, key="view_colour", format_func=lambda c: LENS_COLOURS[c][0],
                      index=colours.index(qp["view_colour"]) if qp.get("view_colour") in colours else 0)
heat = lens_heatmap(table, tokens, site, colour, lens)
st.plotly_chart(heat, width="stretch")
kl = lens_kl_by_layer(table)
st.plotly_chart(kl, width="stretch")
figures = {"lens": heat, "kl": kl}

if "targets" in result.extra:
    st.subheader("Target tokens")
    tg = result.extra["targets"]
    last = tg[(tg["lens"] == lens) & (tg["site"] == site) & (tg["pos"] == tg["pos"].max())]
    st.dataframe(last.pivot(index="layer", columns="target", values="prob"), width="stretch")
    st.caption("Probability at the last position, per layer.")

st.subheader("Top tokens at one cell")
c1, c2 = st.columns(2)
n_layers, n_pos = int(result.meta["n_layers"]), int(result.meta["n_tokens"])
layer = c1.number_input("Layer", 0, n_layers - 1, n_layers - 1, key="cell_layer")
pos = c2.number_input("Position", 0, n_pos - 1, n_pos - 1, key="cell_pos")
top = result.extra["top"]
st.dataframe(top[(top["lens"] == lens) & (top["site"] == site) & (top["layer"] == layer) & (top["pos"] == pos)]
             [["rank", "token", "token_id", "prob"]], hide_index=True, width="stretch")

share_and_export(outcome, {**spec_params(outcome.spec), "view_lens": lens, "view_site": site, "view_colour": colour},
                 figures,
                 f"Lens: {prompt[:60]}")
