"""The Features page: an SAE (trained here or loaded from a SAELens folder) at the top, then one section at a
time — the SAE's own report, feature pages, search, attribution, steering, discover-then-name. The SAE's
settings, the section and each section's settings (the feature shown, the steering strength) live in the URL."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...contract import Page, ViewState, Widget
from ...errors import WorkbenchError
from ...untrusted import md_escape
from ..concepts.page import strip_names
from ..patching.spec import pairs_with_text
from .figures import (
    attribution_scatter,
    context_html,
    density_histogram,
    feature_histogram,
    logit_bars,
    names_summary,
    steer_bars,
    top_features_bar,
    training_curve,
)
from .sae import SAE_FIELDS, SAESpec, saelens_zip

SAE_WIDGETS = {
    "source": Widget("SAE", labels={"train": "train one here", "folder": "load a SAELens folder"}, kind="radio"),
    "folder": Widget("Folder (cfg.json + sae_weights.safetensors)"),
    "site": Widget("Hook point"),
    "layer": Widget("Layer (-1: the middle block)"),
    "architecture": Widget("Architecture", labels={"topk": "TopK", "standard": "ReLU + L1", "jumprelu": "JumpReLU"}),
    "width": Widget("Features"),
    "k": Widget("k (TopK)"),
    "l1_coefficient": Widget("L1 coefficient (ReLU)", step=0.5),
    "dead": Widget("Dead features", labels={"auxk": "AuxK loss", "resample": "resample", "none": "nothing"}),
    "steps": Widget("Steps"),
    "corpus": Widget("Training text", labels={"default": "shipped sentences", "text": "my text"}),
    "text": Widget("Your training text (one passage per line)", kind="text_area", height=120),
    "heldout_text": Widget("Held-out text (empty: 10% of the sentences)", kind="text_area", height=80),
}
SECTIONS = {"sae": "SAE", "sae_features": "Feature pages", "sae_encode": "Search", "sae_attribution": "Attribution",
            "sae_steer": "Steering", "sae_names": "Discover & name"}


def feature_link(sae: dict, feature: int) -> str:
    """The address of one feature's page of the SAE these fields name (relative: a link into this app)."""
    from urllib.parse import urlencode

    return "./features?" + urlencode({**sae, "section": "sae_features", "feature": int(feature)})


def with_links(ctx, table, common: dict, column: str = "feature"):
    """(the table with a link to each feature's page first, its column config) — links into this app only."""
    sae = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in common.items() if v != ""}
    link = {f: feature_link(sae, f) for f in table[column].unique()}
    out = table.assign(page=table[column].map(link))[["page", *table.columns]]
    return out, {"page": ctx.st.column_config.LinkColumn("page", display_text=r"feature=(\d+)")}


@dataclass(frozen=True)
class FeatureView(ViewState):
    feature: int = -1  # -1: the strongest live feature
    token_query: str = ""


def sae_form(ctx, model):
    st = ctx.st
    url = ctx.link(SAESpec)
    with st.form("sae"):
        values = ctx.spec_widgets(SAESpec, url, [("source", "folder"), ("site", "layer", "architecture"),
                                                 ("width", "k", "l1_coefficient", "dead", "steps")], SAE_WIDGETS)
        with st.expander("Training text"):
            values.update(ctx.spec_widgets(SAESpec, url, ["corpus", "text", "heldout_text"], SAE_WIDGETS))
        ctx.run_button("Train or load")
    values["folder"] = values["folder"].strip()
    return ctx.run(lambda: ctx.make_spec(SAESpec, model, url, values), model)


def sae_report(ctx, outcome) -> dict:
    st = ctx.st
    m = outcome.result.meta
    c = st.columns(5)
    c[0].metric("FVE (held out)", f"{m['fve']:.3f}")
    c[1].metric("L0", f"{m['l0']:.1f}")
    c[2].metric("Dead features", f"{m['n_dead']} ({m['dead_fraction']:.1%})")
    c[3].metric("CE loss recovered", f"{m['ce_loss_recovered']:.3f}")
    c[4].metric("Features", f"{m['d_sae']:,}")
    st.caption(f"{md_escape(m['hook_name'])} · {md_escape(m['source'])} · {md_escape(m['held_out'])} · CE clean "
               f"{m['ce_clean']:.3f}, with the SAE {m['ce_with_sae']:.3f}, zero-ablated {m['ce_zero_ablated']:.3f} "
               "nats · " + md_escape(m["measured_on"]))
    st.download_button("Download this SAE (a SAELens folder, zipped)", saelens_zip(outcome.result),
                       file_name=f"sae-{m['hook_name']}-{outcome.key[:8]}.zip", mime="application/zip",
                       key=f"saelens-{outcome.key}")
    figs = {"density": density_histogram(outcome.result.table)}
    if len(outcome.result.extra.get("loss", [])):
        figs["training"] = training_curve(outcome.result.extra["loss"])
    for fig in figs.values():
        st.plotly_chart(fig, width="stretch")
    return figs


def _feature_choice(ctx, view, table, label="Feature"):
    st = ctx.st
    W = len(table)
    live = table[table["density"] > 0] if "density" in table else table
    default = int(live.sort_values("max_activation", ascending=False)["feature"].iloc[0]) if len(live) else 0
    start = view.feature if 0 <= view.feature < W else default
    return int(st.number_input(label, 0, W - 1, start, key="feature"))


def browse_section(ctx, model, common, view):
    from .browse import FeaturesSpec

    st = ctx.st
    url = ctx.link(FeaturesSpec)
    outcome = ctx.run(lambda: ctx.make_spec(FeaturesSpec, model, url, common), model)
    r = outcome.result
    f = _feature_choice(ctx, view, r.table)
    row = r.table[r.table["feature"] == f].iloc[0]
    c = st.columns(3)
    c[0].metric("Density", f"{row['density']:.4%}")
    c[1].metric("Max activation", f"{row['max_activation']:.3f}")
    c[2].metric("Top tokens", row["top_tokens"][:40] or "—")
    ex = r.extra["examples"]
    ex = ex[ex["feature"] == f].sort_values("rank")
    st.markdown("**Top-activating contexts** (the strongest token underlined; hover a token for its activation)")
    if ex.empty:
        st.info(f"Feature {f} fired on no token of the corpus (a dead feature).")
    peak = float(row["max_activation"])
    for e in ex.itertuples():
        context = context_html(list(e.tokens), list(e.activations), peak, int(e.max_index))
        st.html(f'<div style="margin:2px 0"><span style="font-family:monospace;color:#666">{e.activation:7.3f}'
                f'&nbsp;</span>{context}</div>')
    hist = feature_histogram(r.extra["histograms"], f)
    logits = logit_bars(r.extra["logits"], f)
    c1, c2 = st.columns(2)
    c1.plotly_chart(hist, width="stretch")
    c2.plotly_chart(logits, width="stretch")
    st.caption(md_escape(r.meta["measured_on"]) + " · logit effects: W_dec[f] · W_U, the direct path without the "
               "final norm")
    with st.expander("All features"):
        st.dataframe(r.table.sort_values("density", ascending=False), hide_index=True, width="stretch")
    return outcome, {"histogram": hist, "logits": logits}, f"Feature {f}", FeatureView(feature=f)


def encode_section(ctx, model, common, view):
    from .browse import FeaturesSpec
    from .steer import FeatureEncodeSpec

    st = ctx.st
    url = ctx.link(FeatureEncodeSpec)
    st.markdown("**Which features fire on a token?** (from the feature pages' index over the corpus)")
    query = st.text_input("Token(s), e.g. ' Paris' (leading spaces count; comma-separated)", view.token_query,
                          key="token_query")
    if query.strip():
        features = ctx.run(lambda: ctx.make_spec(FeaturesSpec, model, ctx.link(FeaturesSpec), common), model)
        by = features.result.extra["by_token"]
        wanted = [t for t in query.split(",") if t]
        hits = by[by["token"].isin(wanted)]
        if hits.empty:
            st.info("None of these tokens occurs in the SAE's corpus (as one token).")
        else:
            hits, config = with_links(ctx, hits, common)
            st.dataframe(hits, hide_index=True, width="stretch", column_config=config)
    st.markdown("**Which features fire on a text?**")
    with st.form("sae_encode"):
        values = ctx.spec_widgets(FeatureEncodeSpec, url, ["prompt", "per_token"],
                                  {"prompt": Widget("Text", kind="text_area", height=80)})
        ctx.run_button("Encode")
    values["token_ids"] = url.token_ids if values["prompt"] == url.prompt else ()
    outcome = ctx.run(lambda: ctx.make_spec(FeatureEncodeSpec, model, url, {**values, **common}), model)
    top, config = with_links(ctx, outcome.result.extra["by_feature"].head(30), common)
    st.dataframe(top, hide_index=True, width="stretch", column_config=config)
    st.caption("Strongest features over the whole text (total activation); per token below.")
    st.dataframe(outcome.result.table, hide_index=True, width="stretch")
    return outcome, {}, "Features on a text", FeatureView(token_query=query)


def attribution_section(ctx, model, common, view):
    from .attribution import FeatureAttributionSpec

    st = ctx.st
    url = ctx.link(FeatureAttributionSpec)
    with st.form("sae_attribution"):
        values = ctx.spec_widgets(FeatureAttributionSpec, url, [("n_pairs", "direction", "max_patched"), "pairs"],
                                  {"pairs": Widget("Prompt pairs as JSON (empty: the shipped IOI pairs)",
                                                   kind="text_area", height=100)})
        ctx.run_button()
    if values["pairs"].strip() and values["pairs"] != url.pairs:
        values["dataset"] = ""
    elif not values["pairs"].strip():
        values.update(dataset="ioi", pairs="")
    outcome = ctx.run(lambda: ctx.make_spec(FeatureAttributionSpec, model, url, {**values, **common}), model)
    m = outcome.result.meta
    c = st.columns(3)
    c[0].metric("Pearson r, AtP vs patching", f"{m['pearson_atp']:.3f}")
    c[1].metric("Pearson r, RelP vs patching", f"{m['pearson_relp']:.3f}")
    c[2].metric("Nodes patched", f"{m['n_patched']:,} of {m['n_nodes']:,}")
    scatter = attribution_scatter(outcome.result.table)
    bars = top_features_bar(outcome.result.extra["by_feature"])
    st.plotly_chart(scatter, width="stretch")
    st.plotly_chart(bars, width="stretch")
    with st.expander("Every feature (summed over positions, mean over pairs)"):
        table, config = with_links(ctx, outcome.result.extra["by_feature"], common)
        st.dataframe(table, hide_index=True, width="stretch", column_config=config)
    st.caption(f"Metric: {m['metric']} (base run {m['base_metric_mean']:.3f}, source run "
               f"{m['source_metric_mean']:.3f}) · {md_escape(m['measured_on'])}"
               + (f" · {md_escape(outcome.spec.pairs_note)}" if outcome.spec.pairs_note else ""))
    if not outcome.spec.pairs_note and values["pairs"].strip():  # a person's pairs: the link keeps their text beside
        # the ids that ran, so another tokenizer can make its own from it
        outcome = dataclasses.replace(outcome, spec=outcome.spec.replace(
            pairs=pairs_with_text(outcome.spec.pairs, values["pairs"])))
    return outcome, {"scatter": scatter, "features": bars}, "Feature attribution", None


def steer_section(ctx, model, common, view):
    from .sae import SAESpec
    from .steer import STRENGTH_STEP, SteerSpec, default_strength, strongest_live_feature

    st = ctx.st
    qp = ctx.query()
    url = ctx.link(SteerSpec)
    # the SAE's per-feature table scales the default strength: the form above ran the SAE, so this is a store hit,
    # its estimate and progress bar drawn in a placeholder that is cleared (a message, if any, stays)
    quiet = st.empty()
    with quiet:
        per_feature = ctx.run(lambda: ctx.make_spec(SAESpec, model, ctx.link(SAESpec), common), model).result.table
    quiet.empty()
    if "feature" not in qp:  # the feature the Feature pages show (a link's), else the SAE's strongest live one
        url = url.replace(feature=strongest_live_feature(per_feature))

    def auto(feature: int, steer_with: str, mode: str) -> float:
        return default_strength(per_feature, feature, steer_with, mode)

    if "strength" not in qp:  # a link's explicit strength is kept; otherwise one that visibly moves the output
        url = url.replace(strength=auto(url.feature, url.steer_with, url.mode))
    # what is steered (direction, mode, feature) is chosen outside the form: a change redraws the form with only the
    # fields that apply and, when the strength was the default, the default for the new choice (keyed widgets, so
    # that a choice survives the link being rewritten under it)
    c1, c2, c3 = st.columns(3)
    with c1:
        how = ctx.spec_widgets(SteerSpec, url, ["steer_with"],
                               {"steer_with": Widget("Direction", kind="radio", key="steer_with",
                                                     labels={"feature": "SAE feature", "probe": "concept probe"})})
    if how["steer_with"] == "feature":
        modes = {"add": "add its direction", "clamp": "clamp it", "ablate": "ablate it"}
        with c2:
            how.update(ctx.spec_widgets(SteerSpec, url, ["mode"],
                                        {"mode": Widget("Mode", kind="radio", labels=modes, key="steer_mode")}))
        with c3:
            how.update(ctx.spec_widgets(SteerSpec, url, ["feature"],
                                        {"feature": Widget("Feature", key="steer_feature")}))
    else:
        how["mode"] = "add"  # a probe direction is added
    before = (url.feature, url.steer_with, url.mode)
    after = (how.get("feature", url.feature), how["steer_with"], how["mode"])
    if after != before and url.strength == auto(*before):
        url = url.replace(strength=auto(*after))  # a default strength follows what is steered
    strength = [] if how["mode"] == "ablate" else ["strength"]
    layout = (["prompt", ("where", "generate"), *strength, ("answer", "wrong")] if how["steer_with"] == "feature" else
              ["prompt", ("concept", "toward", "dataset"), ("where", "generate"), *strength, ("answer", "wrong")])
    reach = max(40.0, 2.5 * abs(url.strength))
    with st.form("sae_steer"):
        values = ctx.spec_widgets(SteerSpec, url, layout, {
            "prompt": Widget("Prompt", kind="text_area", height=68),
            "strength": Widget("Clamp the feature's activation to" if how["mode"] == "clamp" else
                               "Strength (added along the unit direction)", kind="slider", step=STRENGTH_STEP,
                               span=(-reach, reach)),
            "dataset": Widget("Concept data ('shipped' or an uploaded CSV's id)")})
        ctx.run_button("Steer")
    values.update(how)
    values["token_ids"] = url.token_ids if values["prompt"] == url.prompt else ()
    outcome = ctx.run(lambda: ctx.make_spec(SteerSpec, model, url, {**values, **common}), model)
    m = outcome.result.meta
    spec = outcome.spec
    times = f" × {spec.strength:g}" if spec.mode == "add" else ""
    st.caption(f"Steered: {md_escape(m['steered'])}{times} at {m['hook_name']} · KL(before ‖ after) "
               f"{m['kl_before_after']:.4f} nats")
    if "generated_before" in m:
        c1, c2 = st.columns(2)
        c1.markdown("**Before**")
        c1.code(outcome.spec.prompt + m["generated_before"], language=None, wrap_lines=True)
        c2.markdown("**After**")
        c2.code(outcome.spec.prompt + m["generated_after"], language=None, wrap_lines=True)
    if "metric_before" in m:
        st.metric(md_escape(m["metric"]), f"{m['metric_after']:.3f}", f"{m['metric_after'] - m['metric_before']:+.3f}")
    bars = steer_bars(outcome.result.table)
    st.plotly_chart(bars, width="stretch")
    st.dataframe(outcome.result.table, hide_index=True, width="stretch")
    return outcome, {"next_token": bars}, f"Steering: {outcome.spec.prompt[:50]}", None


def names_section(ctx, model, common, view):
    from .naming import FeatureNamesSpec

    st = ctx.st
    url = ctx.link(FeatureNamesSpec)
    with st.form("sae_names"):
        values = ctx.spec_widgets(FeatureNamesSpec, url, [("dataset", "concepts", "target"),
                                                          ("tokens", "drop_last", "pool"),
                                                          ("min_auroc", "per_class", "n_random")],
                                  {"dataset": Widget("Concept data ('shipped' or an uploaded CSV's id)"),
                                   "concepts": Widget("Concepts (empty: all but the target)"),
                                   "target": Widget("Behaviour: 'next_token' or a label column"),
                                   "tokens": Widget("Tokens the model chooses from"),
                                   "min_auroc": Widget("Name at AUROC ≥", step=0.05)})
        ctx.run_button("Name")
    values.update(concepts=strip_names(values["concepts"]), target=values["target"].strip(),
                  dataset=values["dataset"].strip())
    outcome = ctx.run(lambda: ctx.make_spec(FeatureNamesSpec, model, url, {**values, **common}), model)
    r = outcome.result
    m = r.meta
    c = st.columns(3)
    c[0].metric("Named features", f"{m['n_named']} of {m['n_live']} live")
    c[1].metric("Feature bottleneck accuracy", f"{m['accuracy']:.3f}", f"{m['accuracy'] - m['probe_accuracy']:+.3f} "
                "vs probes")
    c[2].metric("Completeness", f"{m['completeness']:.3f}", f"probes {m['probe_completeness']:.3f}",
                delta_color="off")
    fig = names_summary(r.extra["summary"])
    st.plotly_chart(fig, width="stretch")
    st.dataframe(r.extra["summary"], hide_index=True, width="stretch")
    st.caption(md_escape(m["measured_on"]) + f" · chance {m['chance']:.3f}")
    st.markdown("**Named features** (each by the label it separates best, and by the tokens it peaks on)")
    named, config = with_links(ctx, r.table, common)
    st.dataframe(named, hide_index=True, width="stretch", column_config=config)
    return outcome, {"bottlenecks": fig}, "Discover-then-name", None


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Features", "Sparse autoencoder features: what each one reads, which carry a behaviour, what "
                                  "steering with one does, and which concepts they name.")
    view = ctx.view(FeatureView)
    qp = ctx.query()
    sae = sae_form(ctx, model)
    common = {f: getattr(sae.spec, f) for f in SAE_FIELDS}
    ids = list(SECTIONS)
    section = st.radio("Section", ids, horizontal=True, format_func=SECTIONS.get, key="section",
                       index=ids.index(qp["section"]) if qp.get("section") in ids else 0)
    sections = {"sae_features": browse_section, "sae_encode": encode_section, "sae_attribution": attribution_section,
                "sae_steer": steer_section, "sae_names": names_section}
    if section == "sae":
        figures = sae_report(ctx, sae)
        outcome, title, section_view = sae, f"SAE at {sae.result.meta['hook_name']}", None
    else:
        try:
            outcome, figures, title, section_view = sections[section](ctx, model, common, view)
        except WorkbenchError as e:  # e.g. a feature number a link carries that this SAE does not have
            ctx.error(e)
            st.stop()
    params = {**ctx.spec_params(outcome.spec), "section": section}
    ctx.share(outcome, params, figures, title, view=section_view)


# the sections' analyses have no page of their own: they show here
PAGE = Page(title="Features", render=render, url_path="features", icon=":material/scatter_plot:", order=65)
