"""Runs: what the store holds (analysis, model, when, time taken, where, key, a link that opens it) and the
batches in progress (specs done of total), refreshed while one runs, so a team sees a batch's results appear."""
from __future__ import annotations

import json
from urllib.parse import urlencode

import streamlit as st

from analysis import WorkbenchError
from analysis.analyses.quant.page import run_query as quant_run_query
from analysis.registry import REGISTRY
from views.common import MODEL_KEYS, show_error, store

MAX_ROWS = 2000


# analyses with no page of their own that another page shows: that page's analysis, and the link fields (besides
# the model's) that open a stored run there
SHOWN_ON = {"quant_traces": ("quant_sensitivity", quant_run_query),
            "quant_allocation": ("quant_sensitivity", quant_run_query),
            # the Circuits page runs the circuit of the same pairs and shows the intervention below its graph
            "circuit_intervention": ("circuit", lambda analysis, spec: {k: v for k, v in spec.items()
                                                                        if k not in MODEL_KEYS})}


def _link_value(v):
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def run_link(analysis: str, spec_json: str) -> str | None:
    """The app's link to a stored run (its page with the run's fields, token ids included, so it opens from the
    store; or the page that shows it, such as the Quantization page for its Hessian traces and bit allocation);
    None for an analysis no page shows on its own (an input such as the SAE's encodings)."""
    a = REGISTRY.get(analysis)
    if a is None:
        return None
    try:
        spec = json.loads(spec_json)
    except ValueError:
        return None
    if a.page is None and analysis in SHOWN_ON:
        host, fields = SHOWN_ON[analysis]
        a = REGISTRY[host]
        spec = {**{k: v for k, v in spec.items() if k in MODEL_KEYS}, **fields(analysis, spec)}
    if a.page is None:
        return None
    params = {k: _link_value(v) for k, v in spec.items() if v not in ("", [], (), None)
              and not (k == "bos" and v == "auto")}
    path = a.page.url_path
    if a.page.section_of:
        owner = next(o for o in REGISTRY.values() if o.page is not None and o.page.url_path == a.page.section_of)
        path, params = owner.page.url_path, {**params, "section": analysis}
    return f"/{path}?{urlencode(params)}"


@st.fragment(run_every=3)
def batches() -> None:
    """Batches in the store: those running first, with their progress (refreshed every few seconds). When a
    batch starts or ends, the whole page reruns, so the run list refreshes while one is running."""
    try:
        df = store().batches()
    except WorkbenchError as e:
        show_error(e)
        return
    running = sorted(df.loc[df["status"] == "running", "id"]) if not df.empty else []
    if st.session_state.setdefault("runs_running", running) != running:
        st.session_state["runs_running"] = running
        st.rerun(scope="app")
    if df.empty:
        return
    st.subheader("Batches", anchor=False)
    for b in df.head(10).itertuples(index=False):
        finished = b.done + b.hits + b.failed
        label = (f"`{b.id}` · {b.executor} · {b.status} · {b.done} computed, {b.hits} from the store, "
                 f"{b.failed} failed of {b.total} · updated {b.updated:%Y-%m-%d %H:%M:%S}")
        if b.status == "running":
            st.progress(min(finished / max(b.total, 1), 1.0), text=label)
        else:
            st.caption(label)


def listing() -> None:
    """The stored runs, newest first, filtered by analysis and model."""
    try:
        runs = store().runs()
    except WorkbenchError as e:  # the store is busy or unreadable: say so, change nothing
        show_error(e)
        return
    if runs.empty:
        st.info("The store holds no runs yet. Run an analysis on any page, or a batch from the command line.")
        return
    c1, c2 = st.columns(2)
    names = sorted(runs["analysis"].unique())
    pick = c1.multiselect("Analyses", names, default=[], placeholder="all", key="runs_pick")
    model = c2.text_input("Model contains", max_chars=200, key="runs_model")
    if pick:
        runs = runs[runs["analysis"].isin(pick)]
    if model:
        runs = runs[runs["model"].str.contains(model, regex=False, case=False)]
    shown = runs.head(MAX_ROWS).copy()
    shown["open"] = [run_link(a, s) for a, s in zip(shown["analysis"], shown["spec"])]
    st.caption(f"{len(runs):,} runs" + (f" (the newest {MAX_ROWS:,} shown)" if len(runs) > MAX_ROWS else ""))
    st.dataframe(
        shown[["analysis", "model", "created", "duration_s", "author", "worker", "key", "open"]],
        hide_index=True, width="stretch",
        column_config={"open": st.column_config.LinkColumn("Open", display_text="open"),
                       "duration_s": st.column_config.NumberColumn("Time taken (s)", format="%.2f"),
                       "created": st.column_config.DatetimeColumn("When", format="YYYY-MM-DD HH:mm:ss")})


st.title("Runs")
st.caption("Every run in the result store, newest first: from pages, the command line and batches "
           "(`python -m analysis batch`). A link opens the run's page with its settings, from the store.")
batches()
# while a batch runs, the list refreshes with it, so its results appear as they are written
st.fragment(listing, run_every=3 if st.session_state.get("runs_running") else None)()
