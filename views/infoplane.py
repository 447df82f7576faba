"""Information-plane page: per layer, the entropy of the representation and its mutual information with the
input and with a target, over the default model's training checkpoints (or any list). Everything runs through
the pipeline (spec -> store or compute) and lives in the URL."""
from __future__ import annotations

import streamlit as st

from analysis.analyses.infoplane.compute import CAVEAT, TARGETS, InfoPlaneSpec
from analysis.analyses.infoplane.figures import info_plane
from views.common import require_model, run_or_stop, share_and_export, spec_from_link, spec_params

FIELDS = ("dataset", "text", "target", "n_samples", "alpha", "diffusion_t", "normalize", "drop_first", "seed",
          "checkpoints")

st.title("Information plane")
st.warning(CAVEAT, icon=":material/info:")
model = require_model()
qp, url = spec_from_link(InfoPlaneSpec, FIELDS)

with st.form("infoplane"):
    c1, c2, c3 = st.columns(3)
    dataset = c1.radio("Text", ["concepts", "text"], index=0 if url.dataset == "concepts" else 1,
                       format_func={"concepts": "shipped concept sentences", "text": "my text"}.get)
    target = c2.selectbox("Target Y", TARGETS, index=TARGETS.index(url.target))
    n_samples = c3.number_input("Token positions sampled", 50, 4000, url.n_samples, step=50)
    text = st.text_area("My text (one passage per line)", value=url.text, height=90)
    c4, c5, c6, c7 = st.columns(4)
    normalize = c4.checkbox("Unit-length residuals", value=url.normalize)
    drop_first = c5.checkbox("Drop position 0", value=url.drop_first)
    alpha = c6.number_input("Rényi α", 0.1, 10.0, url.alpha, step=0.01)
    seed = c7.number_input("Seed", 0, 2**31 - 1, url.seed)
    ckpts = st.text_area("Checkpoints in training order, one per line (empty: the shipped ones)",
                         value="\n".join(url.checkpoints), height=70)
    st.form_submit_button("Run")

outcome = run_or_stop(lambda: InfoPlaneSpec(
    model=model.model, revision=model.revision, dtype=model.dtype, dataset=dataset, text=text, target=target,
    n_samples=int(n_samples), alpha=float(alpha), diffusion_t=url.diffusion_t, normalize=normalize,
    drop_first=drop_first, seed=int(seed),
    checkpoints=tuple(line.strip() for line in ckpts.splitlines() if line.strip())), model)

table = outcome.result.table
estimators = ["renyi", "dse"]
estimator = st.radio("Estimator", estimators, horizontal=True, key="view_estimator",
                     index=estimators.index(qp["view_estimator"]) if qp.get("view_estimator") in estimators else 0,
                     format_func={"renyi": "matrix-based Rényi", "dse": "diffusion spectral"}.get)
plane = info_plane(table, estimator)
st.plotly_chart(plane, width="stretch")
st.caption(f"{outcome.result.meta['n_samples']} token positions · Y = {outcome.result.meta['target']} · X = the "
           "input embedding · T = the residual after each block")
st.dataframe(table[table["estimator"] == estimator], hide_index=True, width="stretch")

share_and_export(outcome, {**spec_params(outcome.spec), "view_estimator": estimator}, {"plane": plane},
                 f"Information plane: Y = {target}")
