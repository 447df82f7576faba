"""Entropy page: attention entropy per head (normalised by the keys each query sees) and predictive entropy per
token through the layers, for the model or across its training checkpoints (the default model's shipped ones
out of the box). Everything runs through the pipeline (spec -> store or compute) and lives in the URL."""
from __future__ import annotations

import streamlit as st

from analysis.analyses.entropy.compute import EntropySpec
from analysis.analyses.entropy.figures import (
    attention_entropy_heatmap,
    entropy_over_training,
    predictive_entropy_heatmap,
)
from views.common import require_model, run_or_stop, share_and_export, spec_from_link, spec_params

DEFAULT_PROMPT = "Then, John and Mary went to the store. John gave a ring to"
FIELDS = ("prompt", "token_ids", "checkpoints", "collapse_below", "fork_quantile")

st.title("Entropy")
st.caption("How sharply does each head attend, how unsure is each layer's prediction, and how do both change "
           "over training?")
model = require_model()
qp, url = spec_from_link(EntropySpec, FIELDS, {"prompt": DEFAULT_PROMPT})

with st.form("entropy"):
    prompt = st.text_area("Prompt", value=url.prompt, max_chars=20_000)
    ckpts = st.text_area("Checkpoints to track, one per line, in training order (folders, hub ids, id@revision)",
                         value="\n".join(url.checkpoints), height=90,
                         help="Empty: the default model's shipped checkpoints, or the chosen model alone.")
    c1, c2 = st.columns(2)
    collapse = c1.slider("Collapsed below (normalised entropy)", 0.0, 1.0, url.collapse_below, 0.01)
    fork_q = c2.slider("Forking tokens: final entropy above quantile", 0.0, 1.0, url.fork_quantile, 0.05)
    st.form_submit_button("Run")

checkpoints = tuple(line.strip() for line in ckpts.splitlines() if line.strip())
outcome = run_or_stop(lambda: EntropySpec(
    model=model.model, revision=model.revision, dtype=model.dtype, prompt=prompt,
    token_ids=url.token_ids if prompt == url.prompt else (), checkpoints=checkpoints,
    collapse_below=float(collapse), fork_quantile=float(fork_q)), model)

result = outcome.result
heads, summary = result.table, result.extra["over_training"]
steps = [int(s) for s in result.meta["steps"]]
try:
    wanted = int(qp.get("view_step", steps[-1]))
except ValueError:
    wanted = steps[-1]
step = st.select_slider("Checkpoint (training step)", options=steps, key="view_step",
                        value=wanted if wanted in steps else steps[-1]) if len(steps) > 1 else steps[0]
att = attention_entropy_heatmap(heads, step)
pred = predictive_entropy_heatmap(result.extra["predictive"], result.extra["tokens"], step)
training = entropy_over_training(heads, summary)
left, right = st.columns(2)
left.plotly_chart(att, width="stretch")
right.plotly_chart(pred, width="stretch")
st.plotly_chart(training, width="stretch")
st.subheader("Over training")
st.dataframe(summary, hide_index=True, width="stretch")
collapsed = heads[(heads["step"] == step) & heads["collapsed"]]
st.caption(f"Collapsed heads at step {step}: " + (", ".join(f"L{r.layer}H{r.head}" for r in collapsed.itertuples())
                                                  or "none"))

share_and_export(outcome, {**spec_params(outcome.spec), "view_step": step},
                 {"attention": att, "predictive": pred, "training": training}, f"Entropy: {prompt[:60]}")
