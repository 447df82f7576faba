"""The Model page: the model's summary, the tokenization of a prompt, its top next-token predictions and the
attention pattern of any head. Rendered by the app with a page context (`views.page.PageContext`)."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ...contract import Page, ViewState, Widget
from ...models import display_name
from .figures import attention_heatmap, predictions_bar
from .spec import ModelViewSpec

DEFAULT_PROMPT = "Then, John and Mary went to the store. John gave a ring to"
WIDGETS = {"prompt": Widget("Prompt", "text_area", key="prompt"),
           "top_k": Widget("Top-k predictions", "slider", key="top_k")}


@dataclass(frozen=True)
class ModelView(ViewState):
    layer: int = 0
    head: int = 0


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Model")
    st.caption(display_name(model.model))
    url, view = ctx.link(ModelViewSpec, PAGE.defaults), ctx.view(ModelView)
    values = ctx.spec_widgets(ModelViewSpec, url, ["prompt", "top_k"], WIDGETS)
    # the link's token ids replay exactly what ran, as long as the prompt is the one the link came with
    ids = url.token_ids if values["prompt"] == url.prompt else ()
    outcome = ctx.run(lambda: ctx.make_spec(ModelViewSpec, model, url, {**values, "token_ids": ids}), model)

    result, summary = outcome.result, outcome.result.meta.get("model_summary", {})
    tokens = result.extra["tokens"]
    n_layers, n_heads = int(summary.get("n_layers", 1)), int(summary.get("n_heads", 1))
    cols = st.columns(6)
    for col, (label, value) in zip(cols, [("Layers", n_layers), ("Heads", n_heads), ("d_model", summary.get("d_model")),
                                          ("Vocabulary", f"{summary.get('d_vocab', 0):,}"),
                                          ("Context", summary.get("n_ctx")),
                                          ("Parameters", f"{summary.get('n_params', 0) / 1e6:.2f} M")]):
        col.metric(label, value)
    with st.expander("Configuration", expanded=False):
        details = dict(summary)
        if display_name(str(summary.get("name", ""))) != summary.get("name"):  # a file or folder: its name, then
            details = {"name": display_name(summary["name"]), "path": summary["name"], **{  # the whole path
                k: v for k, v in summary.items() if k != "name"}}
        st.dataframe(pd.DataFrame({"field": list(details), "value": [str(v) for v in details.values()]}),
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
    layer = c1.number_input("Layer", 0, n_layers - 1, view.layer if 0 <= view.layer < n_layers else 0, key="layer")
    head = c2.number_input("Head", 0, n_heads - 1, view.head if 0 <= view.head < n_heads else 0, key="head")
    heat = attention_heatmap(result.extra["attention"], tokens, int(layer), int(head))
    st.plotly_chart(heat, width="stretch")

    ctx.share(outcome, ctx.spec_params(outcome.spec), {"predictions": bars, "attention": heat},
              f"Model view: {values['prompt'][:60]}", view=ModelView(int(layer), int(head)))


PAGE = Page(title="Model", render=render, url_path="model", icon=":material/neurology:", order=0, default=True,
            defaults={"prompt": DEFAULT_PROMPT})
