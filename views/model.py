"""Model page: the model's summary, the tokenization of a prompt, its top next-token predictions and the
attention pattern of any head. Everything comes through the pipeline (spec -> store or compute)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.analyses.model_view.figures import attention_heatmap, predictions_bar
from analysis.analyses.model_view.spec import ModelViewSpec
from views.common import require_model, run_or_stop, share_and_export, spec_from_link, spec_params

DEFAULT_PROMPT = "Then, John and Mary went to the store. John gave a ring to"

st.title("Model")
model = require_model()
qp, url = spec_from_link(ModelViewSpec, ("prompt", "token_ids", "top_k"), {"prompt": DEFAULT_PROMPT})

prompt = st.text_area("Prompt", value=url.prompt, key="prompt", max_chars=20_000)
top_k = st.slider("Top-k predictions", 1, 100, url.top_k, key="top_k")
# the link's token ids replay exactly what ran, as long as the prompt is the one the link came with
ids = url.token_ids if prompt == url.prompt else ()
outcome = run_or_stop(lambda: ModelViewSpec(model=model.model, revision=model.revision, dtype=model.dtype,
                                             prompt=prompt, token_ids=ids, top_k=top_k), model)

result, summary = outcome.result, outcome.result.meta.get("model_summary", {})
tokens = result.extra["tokens"]
n_layers, n_heads = int(summary.get("n_layers", 1)), int(summary.get("n_heads", 1))


def _view_int(name: str, upper: int) -> int:
    try:
        v = int(qp.get(name, 0))
    except ValueError:
        v = 0
    return v if 0 <= v < upper else 0


cols = st.columns(6)
for col, (label, value) in zip(cols, [("Layers", n_layers), ("Heads", n_heads), ("d_model", summary.get("d_model")),
                                      ("Vocabulary", f"{summary.get('d_vocab', 0):,}"),
                                      ("Context", summary.get("n_ctx")),
                                      ("Parameters", f"{summary.get('n_params', 0) / 1e6:.2f} M")]):
    col.metric(label, value)
with st.expander("Configuration", expanded=False):
    st.dataframe(pd.DataFrame({"field": list(summary), "value": [str(v) for v in summary.values()]}),
                 hide_index=True, width="stretch")
    st.caption(f"Fingerprint (content hash of the weights): `{outcome.record.fingerprint}`")

st.subheader("Tokens")
st.text(f"{len(tokens)} tokens: " + " · ".join(f"{t!r}" for t in tokens["token"]))
with st.expander("Token ids", expanded=False):
    st.dataframe(tokens, hide_index=True, width="stretch")

st.subheader("Next-token predictions")
left, right = st.columns([2, 3])
left.dataframe(result.table[["rank", "token", "token_id", "prob", "logit"]], hide_index=True, width="stretch")
bars = predictions_bar(result.table)
right.plotly_chart(bars, width="stretch")

st.subheader("Attention pattern")
c1, c2 = st.columns(2)
layer = c1.number_input("Layer", 0, n_layers - 1, _view_int("layer", n_layers), key="layer")
head = c2.number_input("Head", 0, n_heads - 1, _view_int("head", n_heads), key="head")
heat = attention_heatmap(result.extra["attention"], tokens, int(layer), int(head))
st.plotly_chart(heat, width="stretch")

share_and_export(outcome, {**spec_params(outcome.spec), "layer": int(layer), "head": int(head)},
                 {"predictions": bars, "attention": heat}, f"Model view: {prompt[:60]}")
