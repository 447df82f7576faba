"""The interpretability workbench: `streamlit run app.py`.

The sidebar picks the model (the shipped default model, one of its training checkpoints, a Hugging Face id or a
local folder), the device and the dtype; each registered analysis's page (analysis/analyses/*/page.py) shows
analyses of it. All state lives in the URL
(?model=...&dtype=...&prompt=...&token_ids=...), so a copied link opens the same view, from the store.

WORKBENCH_REVIEW_MODE=1 turns the app into a viewer of stored results and findings: nothing loads or computes.
"""
from __future__ import annotations

import functools

import streamlit as st

from analysis import DEFAULT_MODEL, WorkbenchError, load_model
from analysis.models import DEVICES, DTYPES, display_name, list_checkpoints
from analysis.registry import ANALYSES
from analysis.settings import allow_remote_code, review_mode
from analysis.specs import BOS_CHOICES, Spec
from analysis.untrusted import md_escape
from views.common import TOKENIZER_KEY, WATCHED, ModelChoice, query, show_error, store
from views.page import PageContext

st.set_page_config(page_title="Interpretability workbench", page_icon="🔬", layout="wide")  # an emoji: a material
# icon as the page icon is fetched from fonts.gstatic.com by every browser

OTHER = "Hugging Face id or local folder…"


def _checkpoints() -> dict[str, str]:
    return {f"checkpoint step {step}": str(path) for step, path in list_checkpoints()}


def name_ids_tokenizer(qp: dict, same_model: bool, tokenizer: str | None) -> None:
    """A link from before links named the tokenizer of their token ids (`tok`) made them with the model it names:
    name that model's tokenizer (this one's, if it is the model the sidebar loaded; else one that matches none), so
    that the page makes them again from the text for another model (views/page.py, PageContext.own_token_ids)."""
    if tokenizer is None or TOKENIZER_KEY in qp or not any(
            _holds_ids(a.spec, f, qp[f]) for a in ANALYSES for f in a.spec.token_id_fields if f in qp):
        return
    st.query_params[TOKENIZER_KEY] = tokenizer if same_model else "another"


def _holds_ids(spec_cls, name: str, value: str) -> bool:
    try:
        return spec_cls.holds_ids(name, value)
    except WorkbenchError:  # a value that does not parse: the page says so
        return False


def sidebar() -> ModelChoice | None:
    """The model picker. Returns the choice, or None (with the reason shown) if it cannot be used."""
    try:
        qp = query()
        url = Spec.from_dict({k: qp[k] for k in ("model", "revision", "dtype", "bos") if k in qp})
    except WorkbenchError as e:
        show_error(f"This link's model settings are not valid: {e}", st.sidebar)
        url = Spec()
        qp = {}
    ckpts = _checkpoints()
    by_path = {v: k for k, v in ckpts.items()}
    choices = [DEFAULT_MODEL, *ckpts, OTHER]
    preset = DEFAULT_MODEL if url.model == DEFAULT_MODEL else by_path.get(url.model, OTHER)
    with st.sidebar:
        st.header("Model")
        if review_mode():
            st.info("Review mode: browsing stored results and findings. Nothing is loaded or computed.")
        pick = st.selectbox("Model", choices, index=choices.index(preset), key="model_pick")
        revision = ""
        if pick == OTHER:
            name = st.text_input("Hugging Face id or folder", value=url.model if preset == OTHER else "",
                                 placeholder="EleutherAI/pythia-70m or /path/to/model", key="model_name").strip()
            revision = st.text_input("Revision (hub ids only)", value=url.revision, key="revision").strip()
        else:
            name = ckpts.get(pick, pick)
        device_default = qp.get("device", "auto") if qp.get("device", "auto") in DEVICES else "auto"
        device = st.selectbox("Device", DEVICES, index=DEVICES.index(device_default), key="device")
        dtypes = list(DTYPES)
        dtype = st.selectbox("Dtype", dtypes, index=dtypes.index(url.dtype), key="dtype")
        bos = st.selectbox("BOS token in front of texts", BOS_CHOICES, index=BOS_CHOICES.index(url.bos), key="bos",
                           format_func={"auto": "as the model's tokenizer does", "yes": "always",
                                        "no": "never"}.get)
        trust = allow_remote_code() and st.checkbox("trust_remote_code (runs the repository's own code)")
        if not name:
            st.info("Type a Hugging Face id or a local folder.")
            return None
        choice = ModelChoice(model=name, revision=revision, dtype=dtype, device=device, bos=bos)
        try:
            if review_mode():
                rec = store().model_record(name, revision, dtype)
                if rec is None:
                    raise WorkbenchError(f"Nothing is stored for {name} ({dtype}).",
                                         hint="Review mode only shows stored results.")
                summary = rec["summary"]
            else:
                with st.spinner(f"Loading {name}…"):
                    handle = load_model(name, revision=revision or None, device=device, dtype=dtype,
                                        trust_remote_code=trust)
                summary = handle.info
        except WorkbenchError as e:
            show_error(e)
            return None
        st.session_state["model_summary"] = summary  # pages pick smaller defaults for a large model from it
        name_ids_tokenizer(qp, (url.model, url.revision) == (name, revision), summary.get("tokenizer"))
        adds = summary.get("prepends_bos", True)  # records from before it was kept: every run had a BOS
        st.caption(f"**{md_escape(display_name(name))}** · {summary['architecture']} · "
                   f"{summary['n_params'] / 1e6:.2f} M parameters · "
                   f"{summary['device']} · {summary['dtype']} · its tokenizer "
                   f"{'puts a BOS token in front' if adds else 'adds no BOS token'}")
    # keep the URL in step with the model, so a copied link opens the same one
    for k, v in {"model": name, "revision": revision, "dtype": dtype, "device": device, "bos": bos}.items():
        if v in ("", "auto") and k in ("revision", "device", "bos"):
            if k in st.query_params:
                del st.query_params[k]
        elif st.query_params.get(k) != v:
            st.query_params[k] = v
    return choice


st.session_state[WATCHED] = {}  # keys of the runs' Stop buttons, counted afresh in each rerun
st.session_state["model_choice"] = sidebar()
# one page per registered analysis that has one (the registry is the one list), then the Findings page
ctx = PageContext(ANALYSES)
pages = sorted((a.page for a in ANALYSES if a.page is not None and not a.page.section_of), key=lambda p: p.order)
page = st.navigation([
    *[st.Page(functools.partial(p.render, ctx), title=p.title, icon=p.icon, url_path=p.url_path, default=p.default)
      for p in pages],
    st.Page("views/findings.py", title="Findings", icon=":material/push_pin:", url_path="findings"),
    st.Page("views/runs.py", title="Runs", icon=":material/history:", url_path="runs"),
])
page.run()
