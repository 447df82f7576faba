"""The interpretability workbench: `streamlit run app.py`.

The sidebar picks the model (the shipped default model, one of its training checkpoints, a Hugging Face id or a
local folder), the device and the dtype; the pages under pages/ show analyses of it. The choice lives in the URL
(?model=...&dtype=...&device=...), so a copied link opens the same model.
"""
from __future__ import annotations

import os

import streamlit as st

from analysis import DEFAULT_MODEL, WorkbenchError, load_model
from analysis.models import DEVICES, DTYPES, list_checkpoints

st.set_page_config(page_title="Interpretability workbench", page_icon="🔬", layout="wide")

OTHER = "Hugging Face id or local folder…"


def _model_choices() -> list[str]:
    return [DEFAULT_MODEL] + [f"checkpoint step {step}" for step, _ in list_checkpoints()] + [OTHER]


def _checkpoint_path(choice: str) -> str | None:
    for step, path in list_checkpoints():
        if choice == f"checkpoint step {step}":
            return str(path)
    return None


def sidebar() -> None:
    """Model picker. Puts the loaded handle (or None) in st.session_state['handle']."""
    qp = st.query_params
    url_model = qp.get("model", DEFAULT_MODEL)
    choices = _model_choices()
    paths = {str(p): f"checkpoint step {s}" for s, p in list_checkpoints()}
    preset = paths.get(url_model, url_model if url_model in choices else OTHER)
    with st.sidebar:
        st.header("Model")
        choice = st.selectbox("Model", choices, index=choices.index(preset), key="model_choice")
        if choice == OTHER:
            name = st.text_input("Hugging Face id or folder", value="" if url_model in choices else url_model,
                                 placeholder="EleutherAI/pythia-70m or /path/to/model", key="model_name").strip()
        else:
            name = _checkpoint_path(choice) or choice
        revision = ""
        if choice == OTHER:
            revision = st.text_input("Revision (hub ids only)", value=qp.get("revision", ""), key="revision").strip()
        devices = list(DEVICES)
        device = st.selectbox("Device", devices, index=devices.index(qp.get("device", "auto"))
                              if qp.get("device", "auto") in devices else 0, key="device")
        dtypes = list(DTYPES)
        dtype = st.selectbox("Dtype", dtypes, index=dtypes.index(qp.get("dtype", "float32"))
                             if qp.get("dtype", "float32") in dtypes else 0, key="dtype")
        trust = False
        if os.environ.get("WORKBENCH_ALLOW_REMOTE_CODE") == "1":
            trust = st.checkbox("trust_remote_code (runs the repository's own code)", value=False)
        handle = None
        if name:
            try:
                with st.spinner(f"Loading {name}…"):
                    handle = load_model(name, revision=revision or None, device=device, dtype=dtype,
                                        trust_remote_code=trust)
            except WorkbenchError as e:
                st.error(str(e))
            else:
                st.caption(f"{handle.summary.architecture} · {handle.summary.n_params / 1e6:.2f} M parameters · "
                           f"{handle.device} · {handle.dtype}")
                # keep the URL in step with what is loaded, so a copied link opens the same model
                new = {"model": name, "device": device, "dtype": dtype}
                if revision:
                    new["revision"] = revision
                for k, v in new.items():
                    if qp.get(k) != v:
                        qp[k] = v
        else:
            st.info("Type a Hugging Face id or a local folder.")
    st.session_state["handle"] = handle


sidebar()
page = st.navigation([st.Page("pages/model.py", title="Model", icon="🧠", default=True)])
page.run()
