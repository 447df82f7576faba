"""Model page: the model's summary, the tokenization of a prompt, its top next-token predictions and the
attention pattern of any head."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from analysis import WorkbenchError
from analysis.model_view import attention_patterns, encode, next_token_predictions, tokenize

handle = st.session_state.get("handle")
st.title("Model")
if handle is None:
    st.info("Pick a model in the sidebar.")
    st.stop()

s = handle.summary
cols = st.columns(6)
for col, (label, value) in zip(cols, [("Layers", s.n_layers), ("Heads", s.n_heads), ("d_model", s.d_model),
                                      ("Vocabulary", f"{s.d_vocab:,}"), ("Context", s.n_ctx),
                                      ("Parameters", f"{s.n_params / 1e6:.2f} M")]):
    col.metric(label, value)
with st.expander("Configuration", expanded=False):
    st.dataframe(pd.DataFrame({"field": list(s.as_dict()), "value": [str(v) for v in s.as_dict().values()]}),
                 hide_index=True, width="stretch")
    st.caption(f"Fingerprint (content hash of the weights): `{handle.fingerprint}`")

qp = st.query_params
prompt = st.text_area("Prompt", value=qp.get("prompt", "Then, John and Mary went to the store. John gave a ring to"),
                      key="prompt", max_chars=20_000)
k = st.slider("Top-k predictions", 1, 50, int(qp.get("k", 10)) if str(qp.get("k", "10")).isdigit() else 10, key="k")
try:
    ids = encode(handle, prompt)
except WorkbenchError as e:
    st.error(str(e))
    st.stop()

toks = tokenize(handle, ids)
st.subheader("Tokens")
st.caption(f"{len(ids)} tokens: " + " · ".join(f"{t!r}" for t in toks["token"]))
with st.expander("Token ids", expanded=False):
    st.dataframe(toks, hide_index=True, width="stretch")

st.subheader("Next-token predictions")
preds = next_token_predictions(handle, ids, k=k)
left, right = st.columns([2, 3])
left.dataframe(preds[["rank", "token", "token_id", "prob", "logit"]], hide_index=True, width="stretch")
bars = preds.assign(label=[f"{r}. {t!r}" for r, t in zip(preds["rank"], preds["token"])]).iloc[::-1]
fig = px.bar(bars, x="prob", y="label", orientation="h", labels={"label": "token", "prob": "probability"})
fig.update_layout(height=max(250, 24 * len(preds)), margin=dict(l=0, r=0, t=10, b=0))
right.plotly_chart(fig, width="stretch")

st.subheader("Attention pattern")
c1, c2 = st.columns(2)
layer = c1.number_input("Layer", 0, s.n_layers - 1, 0, key="layer")
head = c2.number_input("Head", 0, s.n_heads - 1, 0, key="head")
att = attention_patterns(handle, ids, layers=[int(layer)])
att = att[att["head"] == int(head)]
labels = [f"{i}:{t!r}" for i, t in zip(toks["pos"], toks["token"])]
grid = att.pivot(index="query_pos", columns="key_pos", values="weight").reindex(
    index=range(len(ids)), columns=range(len(ids)))
heat = px.imshow(grid.values, x=labels, y=labels, color_continuous_scale="Blues", zmin=0, zmax=1,
                 labels={"x": "key", "y": "query", "color": "weight"}, aspect="auto")
heat.update_layout(height=max(300, 22 * len(ids)), margin=dict(l=0, r=0, t=10, b=0))
st.plotly_chart(heat, width="stretch")
