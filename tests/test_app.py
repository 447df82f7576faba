"""Page tests with Streamlit's AppTest: the app runs the real default model through the real pipeline."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.store import Store

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "app.duckdb"))
    from analysis.runner import get_store

    get_store.cache_clear()
    yield Path(tmp_path / "app.duckdb")
    get_store.cache_clear()


def _switch(at: AppTest, page: str) -> AppTest:
    """Switch to a page by its URL path (an analysis's page is a function the app registers, not a file)."""
    if page.endswith(".py"):
        return at.switch_page(page)
    hashes = [h for h, info in at._registered_pages.items() if info.get("url_pathname") == page]
    assert hashes, f"no page at /{page}"
    at._page_hash = hashes[0]
    return at


def _run(page: str | None = None, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    if page:  # the app starts on the Model page; another page's link state is set when switching to it
        at.run()
        at.query_params.clear()
        for k, v in query.items():
            at.query_params[k] = v
        return _switch(at, page).run()
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _errors(at) -> list[str]:
    """The error boxes' text as a person reads it (messages are shown with Markdown escaped)."""
    import re

    return [re.sub(r"\\(.)", r"\1", e.value) for e in at.error]


def _predictions(at):
    return [d.value for d in at.dataframe if "prob" in d.value.columns][0]


def _qp(at, key):
    v = at.query_params.get(key)
    return v[0] if isinstance(v, list) else v


def test_model_page_shows_summary_predictions_and_link():
    at = _run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers"] == "6" and metrics["Heads"] == "4"
    assert len(_predictions(at)) == 10
    assert _qp(at, "model") == "default" and _qp(at, "token_ids").startswith("0,")
    assert any("computed in" in c.value for c in at.caption)


def test_typed_prompt_gives_its_predictions():
    at = _run()
    at.text_area(key="prompt").input("The capital of France is").run()
    assert not at.exception
    assert _predictions(at)["token"].iloc[0] == " Paris"
    assert _qp(at, "prompt") == "The capital of France is"


def test_link_reopens_from_the_store_without_computing(own_store):
    first = _run(prompt="The capital of Japan is", top_k="3", layer="2", head="1")
    assert _predictions(first)["token"].iloc[0] == " Tokyo" and len(_predictions(first)) == 3
    link = {k: _qp(first, k) for k in ("model", "dtype", "prompt", "token_ids", "top_k", "layer", "head")}
    again = _run(**link)
    assert not again.exception
    assert any("from the store" in c.value for c in again.caption)
    assert again.number_input(key="layer").value == 2 and again.number_input(key="head").value == 1
    assert Store(own_store).count("runs") == 1


@pytest.mark.parametrize("query, message", [
    ({"model": "not a model!"}, "neither an existing folder nor a valid Hugging Face model id"),
    ({"model": "/no/such/folder"}, "There is no folder at"),
    ({"top_k": "9999999999999"}, "not a valid int"),
    ({"token_ids": "1,2,x"}, "not a valid int"),
    ({"token_ids": "0,99999999"}, "outside this model's vocabulary"),
    ({"dtype": "<script>alert(1)</script>"}, "must be one of"),
    ({"prompt": "x" * 45_000}, "too long"),
])
def test_hostile_links_get_a_clear_message(query, message):
    at = _run(**query)
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert at.title[0].value == "Model"


def test_a_busy_store_gets_a_message_and_the_page_works_once_it_is_free(own_store, monkeypatch):
    import subprocess
    import sys

    Store(own_store)
    monkeypatch.setenv("WORKBENCH_STORE_TIMEOUT_S", "2")
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, time\n"
                               f"con = duckdb.connect({str(own_store)!r})\nprint('held', flush=True)\n"
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for page in (None, "views/findings.py", "views/runs.py", "concepts"):
            at = _run(page=page)
            assert not at.exception, page
            assert any("is busy: another process has held it" in e for e in _errors(at)), (page, _errors(at))
    finally:
        holder.kill()
        holder.wait()
    at = _run()
    assert not at.exception and not at.error and len(_predictions(at)) > 0


def test_empty_prompt_is_an_error_not_a_crash():
    at = _run()
    at.text_area(key="prompt").input("   ").run()
    assert not at.exception
    assert any("The prompt is empty" in e.value for e in at.error)


def test_script_in_a_prompt_shows_as_text():
    at = _run(prompt="<script>alert(1)</script>")
    assert not at.exception and not at.error
    assert at.text_area(key="prompt").value == "<script>alert(1)</script>"
    assert any("'<' · 's' · 'c' · 'ri' · 'pt' · '>'" in t.value for t in at.text)  # the tokens, as plain text
    assert not any("<script" in m.value for m in at.markdown)


def test_review_mode_browses_stored_and_refuses_to_compute(monkeypatch):
    stored = _run(prompt="The capital of Peru is", top_k="3")
    link = {k: _qp(stored, k) for k in ("model", "dtype", "prompt", "token_ids", "top_k")}
    monkeypatch.setenv("WORKBENCH_REVIEW_MODE", "1")
    import analysis.models as models

    loads = models.MODEL_CACHE.loads
    seen = _run(**link)
    assert not seen.exception and _predictions(seen)["token"].iloc[0] == " Lima"
    assert any("from the store" in c.value for c in seen.caption)
    refused = _run(prompt="The capital of Chile is")
    assert any("computes nothing" in e.value or "has not been run" in e.value for e in refused.error)
    assert models.MODEL_CACHE.loads == loads


def test_findings_page_lists_saved_findings(own_store):
    Store(own_store).add_finding("IOI works", notes="<b>not bold</b>", author="ada", runs=[],
                                 links=["?model=default", "javascript:alert(1)", "http://elsewhere.example/x"])
    at = _run(page="views/findings.py")
    assert not at.exception
    assert at.title[0].value == "Findings"
    assert any(s.value == "IOI works" for s in at.subheader)
    assert any("<b>not bold</b>" in t.value for t in at.text)
    buttons = at.get("link_button")
    assert [b.proto.url for b in buttons] == ["?model=default"]  # only the link into the app is live
    assert any("javascript:alert(1)" in t.value for t in at.text) and any("elsewhere" in t.value for t in at.text)


def test_findings_page_renders_no_markdown_from_titles_authors_or_notes(own_store):
    """An image in a finding would be fetched by every reader's browser (a tracking pixel)."""
    pixel = "![x](http://tracker.example/pixel.png)"
    Store(own_store).add_finding(f"Result {pixel}", notes=pixel, author=f"[ada](http://tracker.example) {pixel}")
    at = _run(page="views/findings.py")
    assert not at.exception
    shown = [e.value for e in (*at.subheader, *at.caption, *at.markdown)]
    assert not any("](http" in v or "![" in v for v in shown), shown  # every bracket is escaped
    assert any(v.startswith("Result \\!\\[x\\]") for v in shown), shown
    assert any(pixel == t.value for t in at.text)  # the notes: plain text, as typed


def test_error_messages_quoting_a_link_render_no_markdown():
    at = _run(model="![x](http://tracker.example/pixel.png)")
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and all("![" not in e and "](http" not in e for e in errors), errors


def test_findings_page_when_empty():
    at = _run(page="views/findings.py")
    assert not at.exception and any("No findings yet" in i.value for i in at.info)


def test_patching_page_runs_all_methods_and_reopens_from_the_store(own_store):
    at = _run(page="patching")
    assert not at.exception and not at.error
    faith = [d.value for d in at.dataframe if "pearson" in d.value.columns][0]
    assert set(faith["method"]) == {"atp", "relp"}
    assert _qp(at, "methods") == "activation,atp,relp" and _qp(at, "view_method") == "activation"
    assert "prompt" not in at.query_params  # no other page's state in this page's link
    link = {k: _qp(at, k) for k in at.query_params}
    again = _run(page="patching", **link)
    assert not again.exception
    assert any("from the store" in c.value for c in again.caption)
    assert Store(own_store).count("runs") == 2  # the Model page's first view, and the patching run


@pytest.mark.parametrize("pairs, message", [
    ("[{", "not valid JSON"),
    ('[{"clean": "The capital of France is", "corrupted": "The capital of the big France is", '
     '"answer": " Paris", "wrong": " Rome"}]', "patching needs equal lengths"),
    ('[{"clean": "The capital of France is", "corrupted": "The capital of Japan is", '
     '"answer": " Paris and more", "wrong": " Rome"}]', "not one"),
])
def test_patching_page_bad_pairs(own_store, pairs, message):
    at = _run(page="patching", pairs=pairs)
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]


def test_lens_page_runs_links_and_reopens_from_the_store(own_store):
    at = _run(page="lens", prompt="The capital of France is", targets=" Paris", lenses="logit,tuned")
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 2  # the lens heatmap and the KL-by-layer curves
    assert _qp(at, "targets") == " Paris" and _qp(at, "target_ids")  # the link keeps the space and the id
    assert "pairs" not in at.query_params
    link = {k: _qp(at, k) for k in at.query_params}
    again = _run(page="lens", **link)
    assert not again.exception and not again.error
    assert any("from the store" in c.value for c in again.caption)
    bad = _run(page="lens", prompt="The capital of France is", targets=" Parisian stuff")
    assert not bad.exception and any("not one" in e.value for e in bad.error)


def test_entropy_page_tracks_the_shipped_checkpoints(own_store):
    at = _run(page="entropy")
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 3  # heads heatmap, predictive heatmap, curves over training
    summary = [d.value for d in at.dataframe if "collapsed_heads" in d.value.columns][0]
    assert list(summary["step"]) == [100, 250, 500, 1000, 2000, 3000, 4000]
    assert _qp(at, "view_checkpoint") == "step 4000"
    link = {k: _qp(at, k) for k in at.query_params}
    again = _run(page="entropy", **{**link, "view_checkpoint": "step 1000"})
    assert not again.exception and any("from the store" in c.value for c in again.caption)
    assert any("step 1000" in c.value for c in again.caption)


def test_no_local_folders_holds_on_every_field_that_names_a_model(own_store, monkeypatch, tiny_dirs):
    """With WORKBENCH_ALLOW_LOCAL_FOLDERS=0 the sidebar refused a server path, but the Entropy and Information-plane
    pages loaded any folder named in their checkpoint lists."""
    folder = str(tiny_dirs["gpt2"])
    monkeypatch.setenv("WORKBENCH_ALLOW_LOCAL_FOLDERS", "0")
    import analysis.models as models

    models.load_model("default")  # loaded before counting: only a refused model could add a load below
    loads = models.MODEL_CACHE.loads
    for page, query in [("entropy", {"checkpoints": folder}), ("infoplane", {"checkpoints": folder}),
                        ("entropy", {"checkpoints": "/no/such/folder"})]:
        at = _run(page=page, **query)
        assert not at.exception
        assert any("not folders or files on the server" in e.value for e in at.error), (page, query)
    sidebar = _run(model=folder)
    assert any("not folders or files on the server" in e.value for e in sidebar.error)
    assert models.MODEL_CACHE.loads == loads  # nothing from the server's folders was loaded
    assert set(Store(own_store).runs()["analysis"]) <= {"model"}  # only the start page's own run was stored
    shipped = _run(page="entropy", checkpoints="data/checkpoints/step-02000")  # the shipped ones stay open
    assert not shipped.exception and not shipped.error


def test_information_plane_page_says_what_it_measures(own_store):
    at = _run(page="infoplane", n_samples="100", checkpoints="default")
    assert not at.exception and not at.error
    assert any("not Shannon information" in w.value for w in at.warning)
    assert len(at.get("plotly_chart")) == 1 and _qp(at, "view_estimator") == "renyi"


@pytest.mark.parametrize("section, query, charts", [
    ("probes", {"max_sentences": "200"}, 1),
    ("bottleneck", {"max_sentences": "200", "n_random": "2"}, 2),
    ("intervention", {"max_sentences": "200"}, 2),  # the dose-response and its log-odds with the refits band
    ("tcav", {"n_inputs": "20", "n_random": "3", "n_examples": "20", "layers": "2,4"}, 1),
    ("atlas", {"method": "pca", "max_points": "500", "max_sentences": "100"}, 1),
])
def test_concepts_page_sections_run_link_and_reopen_from_the_store(own_store, section, query, charts):
    at = _run(page="concepts", section=section, **query)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == charts
    assert _qp(at, "section") == section and _qp(at, "dataset") == "shipped"
    link = {k: _qp(at, k) for k in at.query_params}
    again = _run(page="concepts", **link)
    assert not again.exception and not again.error
    assert any("from the store" in c.value for c in again.caption)


def test_concepts_page_with_an_unknown_dataset_says_so(own_store):
    at = _run(page="concepts", section="probes", dataset="0123456789abcdef")
    assert not at.exception
    assert any("not in this store" in e.value for e in at.error)
    assert Store(own_store).count("runs") == 1  # only the Model page's first view


def test_a_run_over_the_servers_time_limit_is_refused_before_it_starts(own_store, monkeypatch):
    """One request cannot hold the model for everyone: the app refuses a run estimated past the limit."""
    monkeypatch.setenv("WORKBENCH_MAX_RUN_SECONDS", "2")
    at = _run(page="patching", n_pairs="40", components="resid_pre,z_by_pos,pattern_by_pos",
              methods="activation,atp,relp,ig")
    assert not at.exception
    assert any("per request" in e and "batch" in e for e in _errors(at)), _errors(at)
    assert set(Store(own_store).runs()["analysis"]) <= {"model"}
    monkeypatch.setenv("WORKBENCH_MAX_RUN_SECONDS", "0")  # no limit: the same link runs
    small = _run(page="patching", n_pairs="2", components="resid_pre", methods="activation")
    assert not small.exception and not small.error


def test_quantization_link_beyond_the_models_context_says_so(own_store):
    """/quant?seq_len=200 raised IndexError: the default model's context is 128 tokens."""
    at = _run(page="quant", seq_len="200", n_seqs="2")
    assert not at.exception
    assert any("beyond this model's context of 128 tokens" in e.value for e in at.error), [e.value for e in at.error]
    assert set(Store(own_store).runs()["analysis"]) <= {"model"}


def test_quantization_page_runs_links_and_reopens_from_the_store(own_store):
    query = dict(formats="int8-channel,int4-channel,mxfp4", n_seqs="4", seq_len="16", max_samples="6",
                 budget_bits="5")
    at = _run(page="quant", **query)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 3  # heatmap, predicted vs measured, Pareto
    assert _qp(at, "budget_bits") == "5.0" and _qp(at, "view_kind") == "layer"
    link = {k: _qp(at, k) for k in at.query_params}
    again = _run(page="quant", **link)
    assert not again.exception and not again.error
    assert sum("from the store" in c.value for c in again.caption) >= 1
    bad = _run(page="quant", **{**query, "budget_bits": "1.2"})
    assert not bad.exception and any("No assignment fits" in e.value for e in bad.error)


def test_quantization_page_without_single_matrices_says_so(own_store):
    """A sweep by layer and type (as the page picks for a large model) has no per-matrix damage to set against
    the prediction: the page says so instead of failing on an empty correlation table."""
    at = _run(page="quant", units="layer,type", formats="int8-channel", activation_formats="", n_seqs="2",
              seq_len="16", max_samples="4")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("add 'matrix'" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) == 2  # heatmap and Pareto


def test_runs_page_lists_runs_with_links_and_batch_progress(own_store):
    """The Runs page: stored runs with a link that opens each on its page (from the store), and a batch's
    progress as the store records it."""
    from urllib.parse import parse_qs, urlparse

    from analysis.batch import LocalExecutor, execute, plan
    from analysis.runner import get_store, spec_from_dict

    store = get_store()
    specs = [spec_from_dict({"analysis": "lens", "prompt": "The capital of France is"}),
             spec_from_dict({"analysis": "probes", "max_sentences": 80})]
    execute(plan(specs, store), store, LocalExecutor())
    store.start_batch("b-running", total=16, hits=2, failed=1, executor="ray")
    store.update_batch("b-running", done=5)
    at = _run("runs")
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert {"concept_activations", "lens", "probes"} <= set(table["analysis"])  # (and the Model page's own run)
    links = dict(zip(table["analysis"], table["open"]))
    assert links["concept_activations"].startswith("/concepts?")  # the Concepts page is the activations' page
    lens = urlparse(links["lens"])
    assert lens.path == "/lens" and parse_qs(lens.query)["token_ids"][0].startswith("0,")
    probes = urlparse(links["probes"])
    assert probes.path == "/concepts" and parse_qs(probes.query)["section"] == ["probes"]
    bars = [p for p in at.get("progress")]
    assert any("b-running" in str(p.proto) and "5 computed, 2 from the store, 1 failed of 16" in str(p.proto)
               for p in bars)
    # the lens link opens the run on its page from the store
    page = _run("lens", **{k: v[0] for k, v in parse_qs(lens.query).items()})
    assert not page.exception and not page.error
    assert store.hits >= 1


# ----------------------------------------------------------------------------------------------------------
# The Features page
# ----------------------------------------------------------------------------------------------------------
SMALL_SAE = dict(width="64", k="4", steps="150")  # a quick SAE for page tests (the default one: test_features)


def test_features_page_trains_the_default_sae_and_links_it():
    at = _run("features")
    assert not at.exception and not at.error, _errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["FVE (held out)"]) >= 0.9 and float(metrics["L0"]) <= 32
    assert _qp(at, "section") == "sae" and _qp(at, "layer") == "2" and _qp(at, "site") == "resid_post"


def test_a_feature_link_opens_that_features_page():
    at = _run("features", section="sae_features", feature="7", **SMALL_SAE)
    assert not at.exception and not at.error, _errors(at)
    assert at.number_input(key="feature").value == 7
    assert _qp(at, "feature") == "7" and _qp(at, "width") == "64" and _qp(at, "section") == "sae_features"
    assert any(m.label == "Density" for m in at.metric)
    at.number_input(key="feature").set_value(3).run()
    assert not at.exception and _qp(at, "feature") == "3"
    # a link to a feature this SAE does not have shows the strongest one instead
    at = _run("features", section="sae_features", feature="500", **SMALL_SAE)
    assert not at.exception and at.number_input(key="feature").value < 64


def test_steering_link_replays_and_bad_input_gets_messages():
    at = _run("features", section="sae_steer", feature="2", strength="-6.5", prompt="The weather was", **SMALL_SAE)
    assert not at.exception and not at.error, _errors(at)
    assert at.slider[0].value == -6.5 and _qp(at, "strength") == "-6.5" and _qp(at, "token_ids")
    at = _run("features", section="sae_steer", feature="999", prompt="The weather was", **SMALL_SAE)
    assert not at.exception and any("Feature 999 does not exist" in e for e in _errors(at))
    at = _run("features", source="folder", folder="/no/such/folder")
    assert not at.exception and any("not a folder holding cfg.json" in e for e in _errors(at))


def test_circuits_page_opens_a_link_pins_a_node_and_refuses_a_malformed_one(own_store):
    at = _run(page="circuits", n_pairs="4", n_points="6")
    assert not at.exception and not at.error, [e.value for e in at.error]
    # the graph, the faithfulness curves, EAP-IG against patching; the intervention's metric and next tokens
    assert len(at.get("plotly_chart")) == 5
    assert _qp(at, "view_method") == "eap_ig" and int(_qp(at, "n_edges")) >= 1 and not _qp(at, "pinned")
    link = {k: _qp(at, k) for k in at.query_params}
    kept = next(d.value for d in at.dataframe if "target" in d.value.columns)  # the circuit's edges
    node = kept["source"].iloc[0]
    again = _run(page="circuits", **{**link, "n_edges": "25", "pinned": node, "view_method": "relp"})
    assert not again.exception and not again.error and not again.warning
    assert any("from the store" in c.value for c in again.caption)
    assert again.slider(key="n_edges").value == 25 and again.selectbox(key="pinned").value == node
    assert again.selectbox(key="view_method").value == "relp"
    assert any(f"Out of {node}" in m.value for m in again.markdown)
    assert _qp(again, "pinned") == node and _qp(again, "n_edges") == "25"
    again.slider(key="n_edges").set_value(10).run()  # fewer edges: the link follows
    assert not again.exception and _qp(again, "n_edges") == "10"
    # grouped nodes (supernodes) from the link: outlined, their edges summed, written back to the link
    two = list(dict.fromkeys(kept["source"]))[:2]
    grouped = _run(page="circuits", **{**link, "groups": f"movers: {two[0]} + {two[1]}"})
    assert not grouped.exception and not grouped.error and not grouped.warning, [w.value for w in grouped.warning]
    assert _qp(grouped, "groups") == f"movers: {two[0]} + {two[1]}"
    assert any("Edges of the groups" in m.value for m in grouped.markdown)
    grouped.text_input(key="groups").set_value("movers: m5").run()
    assert not grouped.exception and _qp(grouped, "groups") == "movers: m5"
    for bad, says in (({"pinned": "a9.h9"}, "not a node of this model's graph"),
                      ({"pinned": "<script>"}, "not a node of this model's graph"),
                      ({"groups": "<b>x</b>: m1"}, "The groups were not read"),
                      ({"groups": "g: a9.h9 + m1"}, "not nodes of this graph"),
                      ({"n_edges": "99999"}, "outside 1 to")):
        odd = _run(page="circuits", **{**link, **bad})
        assert not odd.exception and not odd.error
        assert any(says in w.value for w in odd.warning), [w.value for w in odd.warning]
    # mean ablation from the link: the form shows it, the link keeps it, the note says what was ablated
    mean = _run(page="circuits", **{**link, "edge_ablation": "mean"})
    assert not mean.exception and not mean.error, _errors(mean)
    box = next(b for b in mean.selectbox if b.label == "Edges outside a circuit")
    assert box.value == "mean" and _qp(mean, "edge_ablation") == "mean"
    assert any("mean over the other pairs' clean prompts" in str(getattr(e, "value", "")) for e in mean.get("markdown")
               + mean.get("caption") + mean.get("json")), "the statistics note"
    # the Model page's first view, the two circuit runs and the intervention on their nodes (the same in every link)
    assert Store(own_store).count("runs") == 4


def test_circuits_page_by_position_opens_a_link_pins_a_positioned_node_and_exports(own_store):
    """Edges by position from a link: the form shows the choice, the graph draws the prompt's tokens across, a
    positioned node pins from the link (its edges below), a position the prompts lack is refused with a message,
    and the download is Neuronpedia's graph JSON (the EAP-IG library's has no positions)."""
    at = _run(page="circuits", n_pairs="3", n_points="4", methods="eap,eap_ig", positions="each")
    assert not at.exception and not at.error, _errors(at)
    box = next(b for b in at.selectbox if b.label == "Edges")
    assert box.value == "each" and _qp(at, "positions") == "each"
    assert any("by position" in c.value for c in at.caption)
    link = {k: _qp(at, k) for k in at.query_params}
    kept = next(d.value for d in at.dataframe if "target" in d.value.columns)
    assert "position" in kept.columns and all("@" in s for s in kept["source"])
    node = kept["source"].iloc[0]
    again = _run(page="circuits", **{**link, "pinned": node, "n_edges": "30"})
    assert not again.exception and not again.error and not again.warning, [w.value for w in again.warning]
    assert again.selectbox(key="pinned").value == node and _qp(again, "pinned") == node
    assert any(f"Out of {node}" in m.value for m in again.markdown)
    labels = [e.proto.label for e in again.get("download_button")]
    assert "Download the graph (Neuronpedia attribution-graph JSON)" in labels
    assert "Download the graph (EAP-IG JSON)" not in labels
    odd = _run(page="circuits", **{**link, "pinned": "a0.h0@99"})
    assert not odd.exception and not odd.error
    assert any("not a node of this model's graph" in w.value for w in odd.warning), [w.value for w in odd.warning]
    # an intervention link's node at a position these prompts lack (another model's link): left out with a message,
    # the rest of the link's nodes kept
    nodes = _run(page="circuits", **{**link, "nodes": f"a0.h0@99,{node}"})
    assert not nodes.exception and not nodes.error, _errors(nodes)
    assert any("a0.h0@99 are not in this model's graph" in w.value for w in nodes.warning)
    assert _qp(nodes, "nodes") == node


def test_circuits_page_intervenes_on_chosen_nodes_from_a_link_and_refuses_bad_nodes(own_store):
    """Interventions from the graph: the circuit's nodes set at once (the default), a link's nodes, value and pair
    replayed from the store, the metric and next tokens shown; bad nodes get a message and leave the page, its
    link and the store as they were."""
    at = _run(page="circuits", n_pairs="4", n_points="6", methods="eap,relp")
    assert not at.exception and not at.error, _errors(at)
    default = _qp(at, "nodes").split(",")
    assert default and all(re.fullmatch(r"a\d+\.h\d+|m\d+", n) for n in default)  # the circuit's heads and MLPs
    assert _qp(at, "prompts") == "clean" and _qp(at, "value") == "other"
    link = {k: _qp(at, k) for k in at.query_params}
    chosen = {**link, "nodes": "a1.h0,m2@14", "value": "mean", "pair": "2"}
    again = _run(page="circuits", **chosen)
    assert not again.exception and not again.error and not again.warning, _errors(again)
    assert again.multiselect(key="iv_nodes").value == ["a1.h0", "m2@14"] and again.selectbox(key="pair").value == 2
    assert _qp(again, "nodes") == "a1.h0,m2@14" and _qp(again, "value") == "mean" and _qp(again, "pair") == "2"
    table = next(d.value for d in again.dataframe if "after" in d.value.columns)
    assert len(table) == 4 and (table["before"] == table["clean"]).all()  # the clean prompts, set to the mean
    assert any("→" in m.value and "change" in m.value for m in again.markdown)
    runs = Store(own_store).count("runs")
    replay = _run(page="circuits", **chosen)  # the same link again: everything from the store
    assert not replay.exception and Store(own_store).count("runs") == runs
    assert sum("from the store" in c.value for c in replay.caption) >= 1
    # the Runs page opens the stored intervention on the Circuits page, below its circuit, from the store
    from urllib.parse import parse_qs, urlparse

    from views.runs import run_link

    stored = Store(own_store).runs("circuit_intervention")
    mean_run = next(s for s in stored["spec"] if '"value": "mean"' in s)
    opened = urlparse(run_link("circuit_intervention", mean_run))
    query = {k: v[0] for k, v in parse_qs(opened.query).items()}
    assert opened.path == "/circuits" and query["nodes"] == "a1.h0,m2@14" and query["value"] == "mean"
    from_runs = _run(page="circuits", **{k: v for k, v in query.items() if k not in ("model", "dtype", "bos")})
    assert not from_runs.exception and not from_runs.error, _errors(from_runs)
    assert from_runs.multiselect(key="iv_nodes").value == ["a1.h0", "m2@14"]
    # the intervention from the store (the circuit at the page's defaults for what the intervention does not name)
    assert len(Store(own_store).runs("circuit_intervention")) == len(stored)
    runs = Store(own_store).count("runs")
    for bad, says in (({"nodes": "a9.h0,a1.h0,m2@14"}, "a9.h0 are not in this model's graph"),  # the rest ran
                      ({"nodes": "a1.h7"}, "no components node of this model"),
                      ({"nodes": "<script>alert(1)</script>"}, "is not a node name"),
                      ({"nodes": "m1@99"}, "positions 0 to")):
        odd = _run(page="circuits", **{**chosen, **bad})
        said = _errors(odd) + [w.value for w in odd.warning]
        assert not odd.exception and any(says in e for e in said), (bad, said)
        assert any("Share and export" in h.value for h in odd.subheader)  # the rest of the page stays
    # nothing stored for the refused nodes; one run where no node of the link was this model's: the circuit's own
    assert Store(own_store).count("runs") == runs + 1


def test_feature_circuit_with_attention_saes_from_a_link():
    """sublayers from a link: the link keeps it, the caption names the attention outputs, the nodes carry their
    site, and a link's intervention on attention-output nodes runs through the circuit's attention SAE; a bad
    sublayer name gets a message."""
    small = dict(page="circuits", level="features", n_pairs="4", layers="2", sublayers="attn_out", methods="eap",
                 n_points="3", edge_nodes="12", sae_width="64", sae_steps="100", sae_max_tokens="2048")
    at = _run(**small)
    assert not at.exception and not at.error, _errors(at)
    assert _qp(at, "sublayers") == "attn_out"
    assert any("attention outputs" in c.value for c in at.caption)
    nodes = next(d.value for d in at.dataframe if "kind" in d.value.columns)
    assert {"attn_out", "resid_post"} <= set(nodes["site"])
    # an intervention on an attention feature and the attention SAE's error from the link, through the same SAE
    link = {k: _qp(at, k) for k in at.query_params}
    iv = _run(**{**link, "page": "circuits", "nodes": "attn2.3@15,attnerr2@15"})
    assert not iv.exception and not iv.error, _errors(iv)
    assert _qp(iv, "nodes") == "attn2.3@15,attnerr2@15" and any("→" in m.value for m in iv.markdown)
    odd = _run(**{**small, "sublayers": "hook_z"})  # one message, about what is wrong (the page at its defaults)
    assert not odd.exception and [e for e in _errors(odd) if "not valid" in e] == [
        "This link's settings are not valid: sublayers must be one of attn_out, mlp_out, not 'hook_z'."], _errors(odd)


def test_feature_circuit_link_shows_the_graph_links_feature_pages_and_refuses_a_bad_pin():
    small = dict(page="circuits", level="features", n_pairs="4", layers="1,3", methods="eap,relp", n_points="4",
                 edge_nodes="12", sae_width="64", sae_steps="100", sae_max_tokens="2048")
    at = _run(**small)
    assert not at.exception and not at.error, _errors(at)
    # the graph and the faithfulness curves (no node patching asked); the intervention's metric and next tokens
    assert len(at.get("plotly_chart")) == 4
    # the intervention starts from the graph's strongest feature and error nodes (through the circuit's SAEs)
    assert all(re.fullmatch(r"(f\d+\.\d+|err\d+)@\d+", n) for n in _qp(at, "nodes").split(","))
    assert any("→" in m.value for m in at.markdown)
    assert _qp(at, "view_method") == "relp" and int(_qp(at, "n_edges")) >= 1  # RelP before EAP when no EAP-IG
    nodes = next(d.value for d in at.dataframe if "kind" in d.value.columns)
    pages = nodes[nodes["kind"] == "feature"]["page"]
    assert len(pages) and pages.str.startswith("./features?layer=").all()
    assert pages.str.contains("width=64").all() and pages.str.contains("section=sae_features").all()
    assert nodes[nodes["kind"] != "feature"]["page"].isna().all()
    link = {k: _qp(at, k) for k in at.query_params}
    node = nodes["node"].iloc[0]
    again = _run(**{**link, "page": "circuits", "pinned": node, "view_method": "eap", "n_edges": "5"})
    assert not again.exception and not again.error and not again.warning
    assert any("from the store" in c.value for c in again.caption)
    assert again.selectbox(key="pinned").value == node and again.slider(key="n_edges").value == 5
    assert _qp(again, "pinned") == node and _qp(again, "view_method") == "eap"
    assert any(t.label.startswith("SAE folders to load") for t in at.text_area)
    missing = _run(**{**small, "sae_folders": "/nonexistent/sae"})  # a folder that is not there: a message
    assert not missing.exception and any("is not a folder holding" in e.value for e in missing.error), \
        _errors(missing)
    for bad, says in (({"pinned": "f1.99999@3"}, "not a node of this circuit"),
                      ({"pinned": "<b>x</b>"}, "not a node of this circuit"),
                      ({"n_edges": "99999"}, "outside 1 to")):
        odd = _run(**{**link, "page": "circuits", **bad})
        assert not odd.exception and not odd.error
        assert any(says in w.value for w in odd.warning), [w.value for w in odd.warning]
