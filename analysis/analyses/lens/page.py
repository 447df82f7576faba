"""The Lens page: every layer's residual decoded as a next-token distribution (the logit lens, and the tuned lens
beside it), with entropy, KL from the model's final distribution and the probability of chosen target tokens."""
from __future__ import annotations

from dataclasses import dataclass

from ...contract import Page, ViewState, Widget
from .figures import LENS_COLOURS, lens_heatmap, lens_kl_by_layer
from .spec import LensSpec

DEFAULT_PROMPT = "The capital of France is"
WIDGETS = {
    "prompt": Widget("Prompt", "text_area"),
    "targets": Widget("Target tokens (comma-separated, with their leading spaces)",
                      help="Each must be one token, e.g. ' Paris'."),
    "sites": Widget("Residual sites"),
    "lenses": Widget("Lenses", help="The tuned lens is trained once per model (a few seconds on the default model) "
                                    "and stored; resid_mid has no tuned translator."),
    "top_k": Widget("Top-k"),
}


@dataclass(frozen=True)
class LensView(ViewState):
    view_lens: str = ""
    view_site: str = ""
    view_colour: str = ""


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Lens",
                      "Each layer's residual through the final norm (recomputed on that residual) and the unembedding: "
                      "where does the prediction form?")
    url, view = ctx.link(LensSpec, PAGE.defaults), ctx.view(LensView)
    with st.form("lens"):
        values = ctx.spec_widgets(LensSpec, url, ["prompt", ("targets", "sites", "lenses", "top_k")], WIDGETS)
        ctx.run_button()
    targets = tuple(t for t in values["targets"].split(",") if t.strip())
    values["token_ids"] = url.token_ids if values["prompt"] == url.prompt else ()
    values["target_ids"] = url.target_ids if targets == url.targets else ()
    outcome = ctx.run(lambda: ctx.make_spec(LensSpec, model, url, values), model)

    result = outcome.result
    table, tokens = result.table, result.extra["tokens"]
    done_lenses = list(dict.fromkeys(table["lens"]))
    v0, v1, v2 = st.columns(3)
    lens = ctx.choose(view, "view_lens", "Show lens", done_lenses, slot=v0)
    sites = [s for s in result.meta["sites"] if ((table["lens"] == lens) & (table["site"] == s)).any()]
    site = ctx.choose(view, "view_site", "Show site", sites, slot=v1,
                      fallback="resid_post" if "resid_post" in sites else None)
    colours = list(LENS_COLOURS)
    colour = ctx.choose(view, "view_colour", "Colour by", colours, slot=v2, format_func=lambda c: LENS_COLOURS[c][0])
    heat = lens_heatmap(table, tokens, site, colour, lens)
    st.plotly_chart(heat, width="stretch")
    kl = lens_kl_by_layer(table, result.extra["by_layer"])
    st.plotly_chart(kl, width="stretch")
    st.caption(result.meta["statistics"])
    by_layer = result.extra["by_layer"]
    st.dataframe(by_layer[(by_layer["lens"] == lens) & (by_layer["site"] == site)].drop(columns=["lens", "site"]),
                 hide_index=True, width="stretch")

    if "targets" in result.extra:
        st.subheader("Target tokens")
        tg = result.extra["targets"]
        last = tg[(tg["lens"] == lens) & (tg["site"] == site) & (tg["pos"] == tg["pos"].max())]
        st.dataframe(last.pivot(index="layer", columns="target", values="prob"), width="stretch")
        st.caption("Probability at the last position, per layer.")

    st.subheader("Top tokens at one cell")
    c1, c2 = st.columns(2)
    n_layers, n_pos = int(result.meta["n_layers"]), int(result.meta["n_tokens"])
    layer = c1.number_input("Layer", 0, n_layers - 1, n_layers - 1, key="cell_layer")
    pos = c2.number_input("Position", 0, n_pos - 1, n_pos - 1, key="cell_pos")
    top = result.extra["top"]
    st.dataframe(top[(top["lens"] == lens) & (top["site"] == site) & (top["layer"] == layer) & (top["pos"] == pos)]
                 [["rank", "token", "token_id", "prob"]], hide_index=True, width="stretch")

    ctx.share(outcome, ctx.spec_params(outcome.spec), {"lens": heat, "kl": kl}, f"Lens: {values['prompt'][:60]}",
              view=LensView(lens, site, colour))


PAGE = Page(title="Lens", render=render, url_path="lens", icon=":material/layers:", order=20,
            defaults={"prompt": DEFAULT_PROMPT})
