"""The bottleneck section of the Concepts page."""
from __future__ import annotations

from ...contract import Page, Widget
from ..concepts.page import strip_names
from .compute import BottleneckSpec
from .figures import bottleneck_summary, bottleneck_weights

WIDGETS = {
    "target": Widget("Behaviour: 'next_token' or a label column"),
    "tokens": Widget("Tokens the model chooses from (comma-separated, leading spaces kept)"),
    "drop_last": Widget("Tokens cut from the end of each text"),
    "concepts": Widget("Concepts (empty: all but the target)"),
    "layer": Widget("Layer (-2: each concept's best)"),
    "l1_ratio": Widget("L1 ratio", step=0.1),
    "n_random": Widget("Random draws"),
}


def section(ctx, model, common: dict):
    st = ctx.st
    url = ctx.link(BottleneckSpec)
    with st.form("bottleneck"):
        values = ctx.spec_widgets(BottleneckSpec, url, [("target", "tokens", "drop_last"),
                                                        ("concepts", "layer", "l1_ratio", "n_random")], WIDGETS)
        ctx.run_button()
    values.update(concepts=strip_names(values["concepts"]), target=values["target"].strip())
    outcome = ctx.run(lambda: ctx.make_spec(BottleneckSpec, model, url, {**values, **common}), model)
    m = outcome.result.meta
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Bottleneck accuracy", f"{m['accuracy']:.3f}")
    c2.metric("Completeness", f"{m['completeness']:.3f}")
    c3.metric("Random directions", f"{m['random_accuracy_mean']:.3f} ± {m['random_accuracy_std']:.3f}")
    c4.metric("Full residual", f"{m['full_accuracy']:.3f}")
    if m["random_accuracy_mean"] >= m["accuracy"]:
        st.warning("Random directions predict the behaviour as well as the concepts do: the concepts' accuracy is "
                   "leakage from the representation, not evidence that the behaviour goes through them.")
    heads, weights = bottleneck_summary(outcome.result.extra["summary"]), bottleneck_weights(outcome.result.table)
    st.plotly_chart(heads, width="stretch")
    st.plotly_chart(weights, width="stretch")
    st.caption(f"{m['nonzero_weights']} of {m['n_weights']} weights are non-zero · chance {m['chance']:.3f} · "
               f"{m['n_test']} held-out texts · completeness = (accuracy − chance) / (reference − chance), reference "
               f"{m['reference']:.3f}")
    st.dataframe(outcome.result.extra["summary"], hide_index=True, width="stretch")
    st.markdown("[The same bottleneck on named SAE features: Features → Discover & name](./features?section=sae_names)")
    return outcome, {"heads": heads, "weights": weights}, f"Concept bottleneck: {outcome.spec.target}", {}


PAGE = Page(title="Bottleneck", render=section, section_of="concepts", order=2)
