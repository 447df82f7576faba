"""The Entropy page: attention entropy per head (normalised by the keys each query sees) and predictive entropy
per token through the layers, for the model or across its training checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

from ...contract import Page, ViewState, Widget
from ...untrusted import md_escape
from .compute import EntropySpec
from .figures import attention_entropy_heatmap, entropy_over_training, predictive_entropy_heatmap

DEFAULT_PROMPT = "Then, John and Mary went to the store. John gave a ring to"
WIDGETS = {
    "prompt": Widget("Prompt", "text_area"),
    "checkpoints": Widget("Checkpoints to track, one per line, in training order (folders, hub ids, id@revision)",
                          "lines", height=90, help="Empty: the default model's shipped checkpoints, or the chosen "
                                                   "model alone."),
    "collapse_below": Widget("Collapsed below (normalised entropy)", "slider", step=0.01),
    "fork_quantile": Widget("Forking tokens: final entropy above quantile", "slider", step=0.05),
}


@dataclass(frozen=True)
class EntropyView(ViewState):
    view_checkpoint: str = ""


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Entropy",
                      "How sharply does each head attend, how unsure is each layer's prediction, and how do both "
                      "change over training?")
    url, view = ctx.link(EntropySpec, PAGE.defaults), ctx.view(EntropyView)
    with st.form("entropy"):
        values = ctx.spec_widgets(EntropySpec, url, ["prompt", "checkpoints", ("collapse_below", "fork_quantile")],
                                  WIDGETS)
        ctx.run_button()
    values["token_ids"] = url.token_ids if values["prompt"] == url.prompt else ()
    outcome = ctx.run(lambda: ctx.make_spec(EntropySpec, model, url, values), model)

    result = outcome.result
    heads, summary = result.table, result.extra["over_training"]
    ckpts = list(result.meta["checkpoints"])
    ckpt = ctx.choose(view, "view_checkpoint", "Checkpoint", ckpts, fallback=ckpts[-1],
                      kind="slider") if len(ckpts) > 1 else ckpts[0]
    att = attention_entropy_heatmap(heads, ckpt)
    pred = predictive_entropy_heatmap(result.extra["predictive"], result.extra["tokens"], ckpt)
    training = entropy_over_training(heads, summary)
    left, right = st.columns(2)
    left.plotly_chart(att, width="stretch")
    right.plotly_chart(pred, width="stretch")
    st.plotly_chart(training, width="stretch")
    st.subheader("Over training")
    st.dataframe(summary, hide_index=True, width="stretch")
    collapsed = heads[(heads["checkpoint"] == ckpt) & heads["collapsed"]]
    st.caption(f"Collapsed heads at {md_escape(ckpt)}: " + (", ".join(f"L{r.layer}H{r.head}"
                                                                for r in collapsed.itertuples()) or "none"))

    ctx.share(outcome, ctx.spec_params(outcome.spec), {"attention": att, "predictive": pred, "training": training},
              f"Entropy: {values['prompt'][:60]}", view=EntropyView(ckpt))


PAGE = Page(title="Entropy", render=render, url_path="entropy", icon=":material/scatter_plot:", order=30,
            defaults={"prompt": DEFAULT_PROMPT})
