"""The intervention section of the Concepts page."""
from __future__ import annotations

from ...contract import Page, Widget
from ...untrusted import md_escape
from .compute import InterventionSpec
from .figures import dose_response, log_odds_curve

WIDGETS = {
    "prompt": Widget("Prompt"),
    "concept": Widget("Concept"),
    "toward": Widget("Toward class (empty: the probe's own)"),
    "layer": Widget("Layer (-2: the last)"),
    "where": Widget("Positions pushed"),
    "refits": Widget("Probe refits (for the interval)"),
    "amounts": Widget("Amounts (fractions of the mean residual norm)"),
    "tokens_up": Widget("Tokens expected to rise"),
    "tokens_down": Widget("Tokens expected to fall"),
}


def section(ctx, model, common: dict):
    st = ctx.st
    url = ctx.link(InterventionSpec)
    with st.form("intervention"):
        values = ctx.spec_widgets(InterventionSpec, url, ["prompt", ("concept", "toward", "layer", "where"),
                                                          ("amounts", "refits"), ("tokens_up", "tokens_down")],
                                  WIDGETS)
        ctx.run_button()
    values.update(concept=values["concept"].strip(), toward=values["toward"].strip(),
                  token_ids=url.token_ids if values["prompt"] == url.prompt else ())
    outcome = ctx.run(lambda: ctx.make_spec(InterventionSpec, model, url, {**values, **common}), model)
    m = outcome.result.meta
    fig = dose_response(outcome.result.table, outcome.result.extra["groups"], m["toward"])
    st.plotly_chart(fig, width="stretch")
    odds = log_odds_curve(outcome.result.extra["groups"], m)
    st.plotly_chart(odds, width="stretch")
    acc_ci = (f", 95% interval {m['probe_accuracy_low']:.3f}–{m['probe_accuracy_high']:.3f} over held-out texts"
              if m.get("probe_accuracy_low") == m.get("probe_accuracy_low") and "probe_accuracy_low" in m else "")
    st.caption(f"Pushed along the {md_escape(m['concept'])} probe toward {md_escape(repr(m['toward']))} at layer "
               f"{m['layer']} (held-out probe accuracy {m['probe_accuracy']:.3f}{acc_ci}); one unit = "
               f"{m['residual_norm']:.2f}, the mean residual norm there."
               + (f" {m['statistics']}." if "statistics" in m else ""))
    top = outcome.result.extra["top"]
    st.dataframe(top.pivot(index="rank", columns="amount", values="token"), width="stretch")
    st.caption("Top tokens at the last position for each amount.")
    return outcome, {"dose_response": fig, "log_odds": odds}, f"Intervention: {m['concept']} → {m['toward']}", {}


PAGE = Page(title="Intervention", render=section, section_of="concepts", order=3)
