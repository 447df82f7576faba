"""Concepts page: linear probes per concept and layer, the concept bottleneck, concept interventions, TCAV and the
activation atlas, over the shipped concept sentences or a CSV the user brings. One section at a time; the
section, the dataset and every setting live in the URL, and every result comes through the pipeline (spec ->
store or compute)."""
from __future__ import annotations

import streamlit as st

from analysis import WorkbenchError
from analysis.analyses.atlas.compute import AtlasSpec
from analysis.analyses.atlas.figures import atlas_scatter
from analysis.analyses.bottleneck.compute import BottleneckSpec
from analysis.analyses.bottleneck.figures import bottleneck_summary, bottleneck_weights
from analysis.analyses.concepts.compute import POSITIONS, ProbeSpec
from analysis.analyses.concepts.figures import probe_accuracy
from analysis.analyses.intervention.compute import InterventionSpec
from analysis.analyses.intervention.figures import dose_response
from analysis.analyses.tcav.compute import TCAVSpec
from analysis.analyses.tcav.figures import tcav_scores
from analysis.concept_data import KIND, MAX_BYTES, MIN_PER_CLASS, SHIPPED, save_concepts_csv
from analysis.settings import review_mode
from views.common import query, require_model, run_or_stop, share_and_export, spec_from_link, spec_params, store

SECTIONS = {"probes": "Probes", "bottleneck": "Bottleneck", "intervention": "Intervention", "tcav": "TCAV",
            "atlas": "Atlas"}


@st.cache_resource(show_spinner=False)
def _warm_umap() -> bool:
    """Once per server process: compile (or load from numba's cache) umap's kernels in a background thread, while
    the user works on other sections; the first atlas is then no slower than later ones."""
    from kernels.atlas import warm_up_in_background

    if not review_mode():
        warm_up_in_background()
    return True


def _csv(items) -> tuple[str, ...]:
    return tuple(t for t in items.split(",") if t.strip())


st.title("Concepts")
st.caption("Where does the model represent a concept, does it explain the model's behaviour, and what happens when "
           "the model is pushed along it?")
model = require_model()
try:
    qp = query()
except WorkbenchError:
    qp = {}

# -- the dataset ---------------------------------------------------------------------------------------------
try:
    known = store().datasets(KIND)
except WorkbenchError as e:  # the store is busy or unreadable: say so, change nothing
    st.error(str(e))
    st.stop()
names = {SHIPPED: "shipped sentences (2,000; sentiment, tense, number, topic)"}
names.update({r.id: f"{r.name} ({r.n_rows:,} rows) · {r.id}" for r in known.itertuples()})
if not review_mode():
    with st.expander("Bring your own concepts (CSV)"):
        st.caption(f"A `text` column and one column per concept (class labels); at most {MAX_BYTES // 2**20} MiB, "
                   f"at least {MIN_PER_CLASS} texts per class. It is kept in the result store, so links to it work "
                   "for everyone using this store.")
        upload = st.file_uploader("Concept CSV", type=["csv"], key="concept_csv")
        if upload is not None:
            try:
                new_id = save_concepts_csv(store(), upload.getvalue(), name=upload.name)
            except WorkbenchError as e:
                st.error(str(e))
            else:
                st.success(f"{upload.name} is dataset {new_id}.")
                names.setdefault(new_id, f"{upload.name} · {new_id}")
                if st.session_state.get("uploaded_id") != new_id:  # select it once, then the user decides
                    st.session_state["uploaded_id"] = new_id
                    st.session_state["dataset"] = new_id
                    qp["dataset"] = new_id
link_dataset = qp.get("dataset", SHIPPED)
if link_dataset not in names:
    names[link_dataset] = f"{link_dataset} (not in this store)"
ids = list(names)
dataset = st.selectbox("Concept data", ids, index=ids.index(link_dataset), format_func=names.get, key="dataset")
_warm_umap()
section_ids = list(SECTIONS)
section = st.radio("Section", section_ids, horizontal=True, format_func=SECTIONS.get, key="section",
                   index=section_ids.index(qp["section"]) if qp.get("section") in section_ids else 0)
common = dict(model=model.model, revision=model.revision, dtype=model.dtype, dataset=dataset)

if section == "probes":
    qp, url = spec_from_link(ProbeSpec, ("concepts", "position", "drop_last", "test_fraction", "C", "seed",
                                         "max_sentences"))
    with st.form("probes"):
        c1, c2, c3, c4 = st.columns(4)
        concepts = c1.text_input("Concepts (comma-separated; empty: all)", value=",".join(url.concepts))
        position = c2.selectbox("Position", POSITIONS, index=POSITIONS.index(url.position),
                                format_func={"last": "last token", "mean": "mean over tokens"}.get)
        test_fraction = c3.number_input("Held-out fraction", 0.05, 0.5, url.test_fraction, step=0.05)
        seed = c4.number_input("Seed", 0, 2**31 - 1, url.seed)
        st.form_submit_button("Run")
    outcome = run_or_stop(lambda: ProbeSpec(**common, concepts=tuple(c.strip() for c in _csv(concepts)),
                                            position=position, test_fraction=float(test_fraction), seed=int(seed),
                                            drop_last=url.drop_last, C=url.C, max_sentences=url.max_sentences),
                          model)
    fig = probe_accuracy(outcome.result.table)
    st.plotly_chart(fig, width="stretch")
    st.caption("Selectivity = accuracy − control accuracy: what the probe reads from the representation rather than "
               "memorises. With mean pooling, lexical concepts are readable from the embedding already.")
    st.dataframe(outcome.result.extra["best"], hide_index=True, width="stretch")
    figures, title = {"accuracy": fig}, "Concept probes"

elif section == "bottleneck":
    qp, url = spec_from_link(BottleneckSpec, ("concepts", "target", "tokens", "layer", "position", "drop_last",
                                              "l1_ratio", "C", "n_random", "seed", "max_sentences"))
    with st.form("bottleneck"):
        c1, c2, c3 = st.columns(3)
        target = c1.text_input("Behaviour: 'next_token' or a label column", value=url.target)
        tokens = c2.text_input("Tokens the model chooses from (comma-separated, leading spaces kept)",
                               value=",".join(url.tokens))
        drop_last = c3.number_input("Tokens cut from the end of each text", 0, 64, url.drop_last)
        c4, c5, c6, c7 = st.columns(4)
        concepts = c4.text_input("Concepts (empty: all but the target)", value=",".join(url.concepts))
        layer = c5.number_input("Layer (-2: each concept's best)", -2, 1024, url.layer)
        l1_ratio = c6.number_input("L1 ratio", 0.0, 1.0, url.l1_ratio, step=0.1)
        n_random = c7.number_input("Random draws", 1, 100, url.n_random)
        st.form_submit_button("Run")
    outcome = run_or_stop(lambda: BottleneckSpec(
        **common, concepts=tuple(c.strip() for c in _csv(concepts)), target=target.strip(), tokens=_csv(tokens),
        layer=int(layer), drop_last=int(drop_last), l1_ratio=float(l1_ratio), n_random=int(n_random),
        position=url.position, C=url.C, seed=url.seed, max_sentences=url.max_sentences), model)
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
    figures, title = {"heads": heads, "weights": weights}, f"Concept bottleneck: {url.target}"

elif section == "intervention":
    qp, url = spec_from_link(InterventionSpec, ("prompt", "token_ids", "concept", "toward", "layer", "where",
                                                "amounts", "tokens_up", "tokens_down", "top_k", "position",
                                                "max_sentences"))
    with st.form("intervention"):
        prompt = st.text_input("Prompt", value=url.prompt, max_chars=20_000)
        c1, c2, c3, c4 = st.columns(4)
        concept = c1.text_input("Concept", value=url.concept)
        toward = c2.text_input("Toward class (empty: the probe's own)", value=url.toward)
        layer = c3.number_input("Layer (-2: the last)", -2, 1024, url.layer)
        where = c4.selectbox("Positions pushed", ["all", "last"], index=["all", "last"].index(url.where))
        amounts = st.text_input("Amounts (fractions of the mean residual norm)", value=",".join(map(str, url.amounts)))
        c5, c6 = st.columns(2)
        up = c5.text_input("Tokens expected to rise", value=",".join(url.tokens_up))
        down = c6.text_input("Tokens expected to fall", value=",".join(url.tokens_down))
        st.form_submit_button("Run")
    outcome = run_or_stop(lambda: InterventionSpec.from_dict({
        **common, "prompt": prompt, "token_ids": list(url.token_ids) if prompt == url.prompt else [],
        "concept": concept.strip(), "toward": toward.strip(), "layer": int(layer), "where": where,
        "amounts": amounts, "tokens_up": up, "tokens_down": down, "top_k": url.top_k, "position": url.position,
        "max_sentences": url.max_sentences}), model)
    m = outcome.result.meta
    fig = dose_response(outcome.result.table, outcome.result.extra["groups"], m["toward"])
    st.plotly_chart(fig, width="stretch")
    st.caption(f"Pushed along the {m['concept']} probe toward {m['toward']!r} at layer {m['layer']} "
               f"(probe accuracy {m['probe_accuracy']:.3f}); one unit = {m['residual_norm']:.2f}, the mean residual "
               "norm there.")
    top = outcome.result.extra["top"]
    st.dataframe(top.pivot(index="rank", columns="amount", values="token"), width="stretch")
    st.caption("Top tokens at the last position for each amount.")
    figures, title = {"dose_response": fig}, f"Intervention: {m['concept']} → {m['toward']}"

elif section == "tcav":
    qp, url = spec_from_link(TCAVSpec, ("concept", "value", "target", "layers", "drop_last", "n_examples",
                                        "n_random", "n_inputs", "seed"))
    with st.form("tcav"):
        c1, c2, c3, c4 = st.columns(4)
        concept = c1.text_input("Concept", value=url.concept)
        value = c2.text_input("Class", value=url.value)
        target = c3.text_input("Target token (its logit)", value=url.target)
        drop_last = c4.number_input("Tokens cut from the end of each text", 0, 64, url.drop_last)
        c5, c6, c7 = st.columns(3)
        n_examples = c5.number_input("Texts per concept set", 10, 1000, url.n_examples)
        n_random = c6.number_input("Random concepts", 2, 50, url.n_random)
        n_inputs = c7.number_input("Input texts", 10, 5000, url.n_inputs)
        st.form_submit_button("Run")
    outcome = run_or_stop(lambda: TCAVSpec(
        **common, concept=concept.strip(), value=value.strip(), target=target, drop_last=int(drop_last),
        n_examples=int(n_examples), n_random=int(n_random), n_inputs=int(n_inputs), layers=url.layers,
        seed=url.seed), model)
    m = outcome.result.meta
    fig = tcav_scores(outcome.result.table, outcome.result.extra["draws"], f"{m['concept']}={m['value']}")
    st.plotly_chart(fig, width="stretch")
    st.dataframe(outcome.result.table, hide_index=True, width="stretch")
    st.caption("A layer counts only where the concept's scores differ from random concepts' (two-sided t-test, "
               "Bonferroni over layers) and its CAV separates the concept from random texts (CAV accuracy well "
               "above 0.5).")
    figures, title = {"tcav": fig}, f"TCAV: {m['concept']}={m['value']} → {m['target']!r}"

else:
    qp, url = spec_from_link(AtlasSpec, ("layer", "unit", "position", "method", "max_points", "n_neighbors",
                                         "min_dist", "seed", "max_sentences"))
    with st.form("atlas"):
        c1, c2, c3, c4 = st.columns(4)
        method = c1.selectbox("Method", ["umap", "pca"], index=["umap", "pca"].index(url.method),
                              format_func={"umap": "UMAP", "pca": "PCA (fast)"}.get)
        unit = c2.selectbox("Points", ["token", "text"], index=["token", "text"].index(url.unit),
                            format_func={"token": "every token", "text": "one per text"}.get)
        layer = c3.number_input("Layer (-2: the last)", -2, 1024, url.layer)
        max_points = c4.number_input("At most points", 50, 50_000, url.max_points, step=500)
        st.form_submit_button("Run")
    outcome = run_or_stop(lambda: AtlasSpec(
        **common, method=method, unit=unit, layer=int(layer), max_points=int(max_points), position=url.position,
        n_neighbors=url.n_neighbors, min_dist=url.min_dist, seed=url.seed, max_sentences=url.max_sentences), model)
    table = outcome.result.table
    labels = [c for c in table.columns if c not in ("x", "y", "text_index", "position", "text", "token")]
    colour = st.selectbox("Colour by", labels, key="view_colour",
                          index=labels.index(qp["view_colour"]) if qp.get("view_colour") in labels else 0)
    fig = atlas_scatter(table, colour)
    st.plotly_chart(fig, width="stretch")
    m = outcome.result.meta
    st.caption(f"{m['method'].upper()} of {m['n_points']:,} points at layer {m['layer']} · embedding took "
               f"{m['embed_seconds']:.1f} s")
    figures, title = {"atlas": fig}, f"Activation atlas, layer {m['layer']}"
    qp = {**qp, "view_colour": colour}

extra = {"view_colour": qp["view_colour"]} if section == "atlas" else {}
share_and_export(outcome, {**spec_params(outcome.spec), "section": section, **extra}, figures, title)
