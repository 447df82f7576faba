"""The atlas section of the Concepts page."""
from __future__ import annotations

from dataclasses import dataclass

from ...contract import Page, ViewState, Widget
from .compute import AtlasSpec
from .figures import atlas_scatter

WIDGETS = {
    "method": Widget("Method", labels={"umap": "UMAP", "pca": "PCA (fast)"}),
    "unit": Widget("Points", labels={"token": "every token", "text": "one per text"}),
    "layer": Widget("Layer (-2: the last)"),
    "max_points": Widget("At most points", step=500),
}


@dataclass(frozen=True)
class AtlasView(ViewState):
    view_colour: str = ""


def section(ctx, model, common: dict):
    st = ctx.st
    url, view = ctx.link(AtlasSpec), ctx.view(AtlasView)
    with st.form("atlas"):
        values = ctx.spec_widgets(AtlasSpec, url, [("method", "unit", "layer", "max_points")], WIDGETS)
        ctx.run_button()
    outcome = ctx.run(lambda: ctx.make_spec(AtlasSpec, model, url, {**values, **common}), model)
    table = outcome.result.table
    labels = [c for c in table.columns if c not in ("x", "y", "text_index", "position", "text", "token")]
    colour = ctx.choose(view, "view_colour", "Colour by", labels)
    fig = atlas_scatter(table, colour)
    st.plotly_chart(fig, width="stretch")
    m = outcome.result.meta
    st.caption(f"{m['method'].upper()} of {m['n_points']:,} points at layer {m['layer']} · embedding took "
               f"{m['embed_seconds']:.1f} s")
    return outcome, {"atlas": fig}, f"Activation atlas, layer {m['layer']}", AtlasView(colour).to_query()


PAGE = Page(title="Atlas", render=section, section_of="concepts", order=5)
