"""The Patching page: activation, attribution and relevance patching over prompt pairs, side by side, with a
faithfulness report."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd

from ...contract import Page, ViewState, Widget
from .figures import comparison_scatter, p_floor, patching_heatmap, top_nodes_with_intervals
from .spec import PatchingSpec, pairs_with_text

EXAMPLE_PAIRS = """[
  {"clean": "Then, John and Mary went to the store. John gave a ring to",
   "corrupted": "Then, Adam and Lucy went to the store. Nora gave a ring to",
   "answer": " Mary", "wrong": " John"}
]"""
METHOD_NAMES = {"activation": "activation patching", "atp": "attribution patching (AtP)",
                "relp": "relevance patching (RelP)", "ig": "integrated gradients (Captum)"}
WIDGETS = {
    "dataset": Widget("Prompt pairs", "radio", labels={"ioi": "Shipped IOI pairs", "": "My pairs (JSON)"}),
    "n_pairs": Widget("IOI pairs"),
    "pairs": Widget("Pairs: clean / corrupted prompts (equal length within a pair; other lengths run in groups), "
                    "single-token answers", "text_area",
                    height=140),
    "methods": Widget(labels=METHOD_NAMES),
    "direction": Widget(labels={"denoise": "clean → corrupted", "noise": "corrupted → clean"}),
    "relp_rules": Widget("RelP rules (attention: the AH rule, no gradient through the softmax; q, k and pattern "
                         "scores become unavailable)"),
    "ig_steps": Widget("Integrated-gradients steps"),
    "overlap_k": Widget("Top-k of the overlap"),
}
LAYOUT = ["dataset", ("n_pairs", "ig_steps", "overlap_k"), "pairs", "components", "methods",
          ("metric", "direction"), "relp_rules"]


@dataclass(frozen=True)
class PatchingView(ViewState):
    view_method: str = ""
    view_component: str = ""


def fit_components(ctx, url: PatchingSpec) -> PatchingSpec:
    """The link's components (or the defaults) less those not every block of the sidebar's model has (LFM2's
    convolution blocks have no attention, Mamba's blocks neither attention nor an MLP): a page opened on such a
    model, or switched to one, starts from a sweep it can run and says what it left out. A link that names only
    components the model lacks keeps them, so its run gets the message saying what the model has."""
    have = (ctx.st.session_state.get("model_summary") or {}).get("activations")
    kept = tuple(c for c in url.components if c in have) if have else url.components
    if not kept or kept == url.components:
        return url
    ctx.st.caption(f"Not every block of this model has {', '.join(c for c in url.components if c not in kept)}: "
                   f"left out of the components ({', '.join(kept)} kept).")
    return dataclasses.replace(url, components=kept)


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Patching",
                      "Which components carry the behaviour? Activation patching is the ground truth; attribution "
                      "(AtP) and relevance patching (RelP) estimate it from 2 forwards and 1 backward.")
    url, view = fit_components(ctx, ctx.link(PatchingSpec)), ctx.view(PatchingView)
    if url.pairs:  # a link with its own pairs opens on them
        url = dataclasses.replace(url, dataset="")
    with st.form("patching"):
        values = ctx.spec_widgets(PatchingSpec, dataclasses.replace(url, pairs=url.pairs or EXAMPLE_PAIRS), LAYOUT,
                                  WIDGETS)
        ctx.run_button()
    shipped = values["dataset"] == "ioi"
    values["pairs"] = "" if shipped else values["pairs"]
    make = lambda: ctx.make_spec(PatchingSpec, model, url, values)  # noqa: E731

    outcome = ctx.run(make, model)
    result = outcome.result
    tokens, meta = result.extra["tokens"], result.meta
    table, p_note = p_floor(result.table, meta)  # p_min beside p_value (older stored runs get it here)
    lengths = meta.get("length_groups")
    size = (f"of {len(lengths)} token lengths ({', '.join(f'{n} × {k}' for k, n in lengths.items())} tokens), "
            "positions aligned at the final token" if lengths else f"of {meta['n_tokens']} tokens")
    st.caption(f"{meta['n_pairs']} pairs {size} · {meta['metric']} · clean {meta['clean_metric']:.3f} · "
               f"corrupted {meta['corrupted_metric']:.3f} · BOS in front: {outcome.spec.bos}")
    if meta.get("pairs_note"):
        st.caption(f"Shipped IOI pairs for this model: {meta['pairs_note']}")

    done_methods = list(dict.fromkeys(table["method"]))
    done_components = list(dict.fromkeys(table["component"]))
    v1, v2 = st.columns(2)
    method = ctx.choose(view, "view_method", "Show method", done_methods, slot=v1)
    component = ctx.choose(view, "view_component", "Show component", done_components, slot=v2)
    heat = patching_heatmap(table, tokens, method, component, meta["metric"])
    st.plotly_chart(heat, width="stretch")
    figures = {"heatmap": heat}

    if "faithfulness" in result.extra:
        st.subheader("Faithfulness: each estimator against activation patching")
        st.dataframe(result.extra["faithfulness"], hide_index=True, width="stretch")
        if method != "activation":
            scatter = comparison_scatter(table, method, component)
            st.plotly_chart(scatter, width="stretch")
            figures["comparison"] = scatter

    st.subheader("Top components")
    spread = top_nodes_with_intervals(table, result.extra["per_pair"], tokens, method, component,
                                      metric=meta["metric"])
    st.plotly_chart(spread, width="stretch")
    figures["top_nodes"] = spread
    st.caption(meta["statistics"])
    if method == "activation" and "p_min" in table:
        floor = float(table.loc[table["method"] == "activation", "p_min"].min())
        st.caption(f"The smallest p-value the sign-flip test can give with these {meta['n_pairs']} pairs: "
                   f"{floor:.3g} (column p_min).")
    if p_note:
        st.warning(p_note)
    sub = table[(table["method"] == method) & (table["component"] == component)].dropna(subset=["value"])
    top = sub.reindex(sub["value"].abs().sort_values(ascending=False).index).head(20)
    labels = dict(zip(tokens["pos"], tokens["token"]))
    top = top.assign(token=[repr(labels.get(int(p), "")) if pd.notna(p) else "" for p in top["pos"]])
    st.dataframe(top.drop(columns=["method"]), hide_index=True, width="stretch")

    # shipped pairs are linked by name and count (short links); the user's own by their token ids
    # (with the text of the user's pairs beside their ids, so another tokenizer can make its own from it)
    ctx.share(outcome, ctx.spec_params(make() if shipped else outcome.spec.replace(
        pairs=pairs_with_text(outcome.spec.pairs, values["pairs"]))), figures,
              f"Patching: {', '.join(outcome.spec.components)}", view=PatchingView(method, component))


PAGE = Page(title="Patching", render=render, url_path="patching", icon=":material/swap_horiz:", order=10)
