"""The TCAV section of the Concepts page."""
from __future__ import annotations

from ...contract import Page, Widget
from .compute import TCAVSpec
from .figures import tcav_scores

WIDGETS = {
    "concept": Widget("Concept"),
    "value": Widget("Class"),
    "target": Widget("Target token (its logit)"),
    "drop_last": Widget("Tokens cut from the end of each text"),
    "n_examples": Widget("Texts per concept set"),
    "n_random": Widget("Random concepts"),
    "n_inputs": Widget("Input texts"),
    "layers": Widget("Layers (comma-separated; empty: all)"),
}


def section(ctx, model, common: dict):
    st = ctx.st
    url = ctx.link(TCAVSpec)
    with st.form("tcav"):
        values = ctx.spec_widgets(TCAVSpec, url, [("concept", "value", "target", "drop_last"),
                                                  ("n_examples", "n_random", "n_inputs", "layers")], WIDGETS)
        ctx.run_button()
    values.update(concept=values["concept"].strip(), value=values["value"].strip())
    outcome = ctx.run(lambda: ctx.make_spec(TCAVSpec, model, url, {**values, **common}), model)
    m = outcome.result.meta
    fig = tcav_scores(outcome.result.table, outcome.result.extra["draws"], f"{m['concept']}={m['value']}")
    st.plotly_chart(fig, width="stretch")
    st.dataframe(outcome.result.table, hide_index=True, width="stretch")
    st.caption("A layer counts only where the concept's scores differ from random concepts' (two-sided t-test, "
               "Bonferroni over layers) and its CAV separates the concept from random texts (CAV accuracy well "
               "above 0.5).")
    return outcome, {"tcav": fig}, f"TCAV: {m['concept']}={m['value']} → {m['target']!r}", {}


PAGE = Page(title="TCAV", render=section, section_of="concepts", order=4)
