"""The Concepts page: the concept data (the shipped sentences or a CSV the user brings), then one section at a
time — probes (here), the bottleneck, interventions, TCAV and the atlas (each in its analysis's package, a
`Page(section_of="concepts")`). The section, the dataset and every setting live in the URL."""
from __future__ import annotations

from ... import concept_data
from ...contract import Page, Widget
from ...errors import WorkbenchError
from ...settings import review_mode
from ...untrusted import md_escape
from .compute import ProbeSpec
from .figures import probe_accuracy

PROBE_WIDGETS = {
    "concepts": Widget("Concepts (comma-separated; empty: all)"),
    "position": Widget("Position", labels={"last": "last token", "mean": "mean over tokens"}),
    "test_fraction": Widget("Held-out fraction", step=0.05),
}


def _warm_umap(st) -> None:
    """Once per server process: compile (or load from numba's cache) umap's kernels in a background thread, while
    the user works on other sections; the first atlas is then no slower than later ones."""
    @st.cache_resource(show_spinner=False)
    def warm() -> bool:
        from kernels.atlas import warm_up_in_background

        if not review_mode():
            warm_up_in_background()
        return True

    warm()


def strip_names(text: str) -> tuple[str, ...]:
    """Comma-separated names (concepts, labels) with the spaces around each dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def probes_section(ctx, model, common: dict):
    st = ctx.st
    url = ctx.link(ProbeSpec)
    with st.form("probes"):
        values = ctx.spec_widgets(ProbeSpec, url, [("concepts", "position", "test_fraction", "seed")], PROBE_WIDGETS)
        ctx.run_button()
    values["concepts"] = strip_names(values["concepts"])
    outcome = ctx.run(lambda: ctx.make_spec(ProbeSpec, model, url, {**values, **common}), model)
    fig = probe_accuracy(outcome.result.table)
    st.plotly_chart(fig, width="stretch")
    st.caption("Selectivity = accuracy − control accuracy: what the probe reads from the representation rather "
               "than memorises. With mean pooling, lexical concepts are readable from the embedding already.")
    st.dataframe(outcome.result.extra["best"], hide_index=True, width="stretch")
    st.caption(outcome.result.meta["statistics"])
    return outcome, {"accuracy": fig}, "Concept probes", {}


def _dataset(ctx, qp: dict, store) -> str:
    """The dataset picker (with the CSV upload); returns the dataset id."""
    st = ctx.st
    known = store.datasets(concept_data.KIND)
    names = {concept_data.SHIPPED: "shipped sentences (2,000; sentiment, tense, number, topic)"}
    names.update({r.id: f"{r.name} ({r.n_rows:,} rows) · {r.id}" for r in known.itertuples()})
    link_dataset = qp.get("dataset", concept_data.SHIPPED)
    if not review_mode():
        with st.expander("Bring your own concepts (CSV)"):
            st.caption(f"A `text` column and one column per concept (class labels); at most "
                       f"{concept_data.MAX_BYTES // 2**20} MiB, at least {concept_data.MIN_PER_CLASS} texts per class. "
                       "It is kept in the result store, so links to it work for everyone using this store.")
            upload = st.file_uploader("Concept CSV", type=["csv"], key="concept_csv")
            if upload is not None:
                try:
                    new_id = concept_data.save_concepts_csv(store, upload.getvalue(), name=upload.name)
                except WorkbenchError as e:
                    ctx.error(e)
                else:
                    st.success(f"{md_escape(upload.name)} is dataset {new_id}.")
                    names.setdefault(new_id, f"{upload.name} · {new_id}")
                    if st.session_state.get("uploaded_id") != new_id:  # select it once, then the user decides
                        st.session_state["uploaded_id"] = new_id
                        st.session_state["dataset"] = new_id
                        link_dataset = new_id
    if link_dataset not in names:
        names[link_dataset] = f"{link_dataset} (not in this store)"
    ids = list(names)
    return st.selectbox("Concept data", ids, index=ids.index(link_dataset), format_func=names.get, key="dataset")


def render(ctx) -> None:
    st = ctx.st
    model = ctx.start("Concepts",
                      "Where does the model represent a concept, does it explain the model's behaviour, and what "
                      "happens when the model is pushed along it?")
    qp = ctx.query()
    try:
        dataset = _dataset(ctx, qp, ctx.store())
    except WorkbenchError as e:  # the store is busy or unreadable: say so, change nothing
        ctx.error(e)
        st.stop()
    _warm_umap(st)
    sections = {a.name: a for a in ctx.sections("concepts")}
    ids = list(sections)
    section = st.radio("Section", ids, horizontal=True, format_func=lambda n: sections[n].page.title, key="section",
                       index=ids.index(qp["section"]) if qp.get("section") in ids else 0)
    common = dict(dataset=dataset)
    outcome, figures, title, view = sections[section].page.render(ctx, model, common)
    ctx.share(outcome, {**ctx.spec_params(outcome.spec), "section": section, **view}, figures, title)


PAGE = Page(title="Concepts", render=render, url_path="concepts", icon=":material/category:", order=60)
PROBES_SECTION = Page(title="Probes", render=probes_section, section_of="concepts", order=1)
