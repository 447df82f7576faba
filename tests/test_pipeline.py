"""Specs, the run pipeline (hit / miss / review mode), URL round trips, export and the command line."""
from __future__ import annotations

import dataclasses
import html as htmllib
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import WorkbenchError
from analysis.analyses.model_view.spec import ModelViewSpec
from analysis.export import html_report, item_from_result
from analysis.runner import REGISTRY, run, run_key, spec_from_dict
from analysis.store import Store

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "store.duckdb")


# -- specs --------------------------------------------------------------------------------------------------
def test_spec_json_round_trip_and_coercion():
    spec = ModelViewSpec(prompt=PROMPT, token_ids=(0, 5, 7), top_k=3)
    again = spec_from_dict(json.loads(spec.to_json()))
    assert again == spec
    # URL/CLI values arrive as strings
    assert ModelViewSpec.from_dict({"prompt": PROMPT, "token_ids": "0,5,7", "top_k": "3"}) == spec


@pytest.mark.parametrize("data, message", [
    ({"prompt": "x", "top_k": "1e9"}, "not a valid int"),
    ({"prompt": "x", "top_k": "1000"}, "at most 100"),
    ({"prompt": "x", "top_k": "0"}, "at least 1"),
    ({"prompt": "x", "dtype": "float64"}, "must be one of"),
    ({"prompt": "x", "token_ids": "1,2,banana"}, "not a valid int"),
    ({"prompt": "x", "token_ids": "-4"}, "at least 0"),
    ({"prompt": "x", "token_ids": ",".join(["1"] * 5000)}, "at most 4096"),
    ({"prompt": "x" * 30_000}, "at most 20,000"),
    ({"prompt": "   "}, "The prompt is empty"),
    ({"prompt": "x", "evil": "1"}, "Unknown field"),
    ({"prompt": "x", "model": "a\x00b"}, "not a valid str"),
    ({"prompt": ["not", "a", "string"]}, "not a valid str"),
])
def test_hostile_or_malformed_specs_are_refused(data, message):
    with pytest.raises(WorkbenchError, match=message):
        ModelViewSpec.from_dict(data)


def test_unknown_analysis_is_refused():
    with pytest.raises(WorkbenchError, match="Unknown analysis"):
        spec_from_dict({"analysis": "rm -rf /"})


# -- the pipeline ---------------------------------------------------------------------------------------------
def test_second_run_is_a_hit_and_computes_nothing(store, monkeypatch):
    first = run(ModelViewSpec(prompt=PROMPT, top_k=5), store=store)
    assert not first.hit and store.misses == 1
    calls = []
    analysis = REGISTRY["model"]
    monkeypatch.setitem(REGISTRY, "model", dataclasses.replace(analysis, compute=lambda *a: calls.append(a)))
    second = run(ModelViewSpec(prompt=PROMPT, top_k=5), store=store)
    assert second.hit and calls == [] and store.hits == 1
    assert second.key == first.key
    pd.testing.assert_frame_equal(second.result.table, first.result.table)
    pd.testing.assert_frame_equal(second.result.extra["attention"], first.result.extra["attention"])


def test_key_depends_on_model_spec_and_version(store, default_handle):
    base = run(ModelViewSpec(prompt=PROMPT, top_k=5), store=store)
    spec = base.spec
    assert run_key(default_handle.fingerprint, spec, "1") == base.key
    assert run_key(default_handle.fingerprint, spec, "2") != base.key  # a changed analysis never serves stale
    assert run_key("0" * 32, spec, "1") != base.key  # other weights
    assert run_key(default_handle.fingerprint, spec.replace(top_k=6), "1") != base.key
    # the prompt text is display only once the token ids are fixed
    assert run_key(default_handle.fingerprint, spec.replace(prompt="anything"), "1") == base.key


def test_link_replays_from_token_ids(store, default_handle):
    """A link carries the token ids: it reproduces the run even if the text would tokenize differently."""
    first = run(ModelViewSpec(prompt=PROMPT, top_k=5), store=store)
    ids = first.spec.token_ids
    assert ids == tuple(default_handle.bridge.to_tokens(PROMPT)[0].tolist())
    from_link = ModelViewSpec.from_dict({"prompt": "text that tokenizes otherwise", "token_ids": ",".join(map(str, ids)),
                                         "top_k": "5"})
    again = run(from_link, store=store)
    assert again.hit and again.key == first.key


def test_failed_computation_stores_nothing(store, monkeypatch):
    analysis = REGISTRY["model"]

    def boom(*a):
        raise RuntimeError("interrupted")

    monkeypatch.setitem(REGISTRY, "model", dataclasses.replace(analysis, compute=boom))
    with pytest.raises(RuntimeError):
        run(ModelViewSpec(prompt=PROMPT), store=store)
    assert store.count("runs") == 0 and store.count("results") == 0


def test_review_mode_serves_stored_results_and_refuses_to_compute(store, monkeypatch):
    stored = run(ModelViewSpec(prompt=PROMPT, top_k=5), store=store)
    import analysis.runner as runs_mod

    def no_loading(*a, **k):
        raise AssertionError("review mode must not load a model")

    monkeypatch.setattr(runs_mod, "load_model", no_loading)
    link = ModelViewSpec.from_dict({"token_ids": ",".join(map(str, stored.spec.token_ids)), "top_k": "5"})
    got = run(link, store=store, allow_compute=False)
    assert got.hit and got.key == stored.key
    by_prompt = run(ModelViewSpec(prompt=PROMPT, top_k=5), store=store, allow_compute=False)
    assert by_prompt.key == stored.key
    with pytest.raises(WorkbenchError, match="review mode computes nothing"):
        run(link.replace(top_k=6), store=store, allow_compute=False)
    with pytest.raises(WorkbenchError, match="has not been run"):
        run(ModelViewSpec(prompt="Another prompt"), store=store, allow_compute=False)
    with pytest.raises(WorkbenchError, match="nothing has been stored"):
        run(ModelViewSpec(prompt=PROMPT, model="EleutherAI/pythia-70m"), store=store, allow_compute=False)
    assert store.count("runs") == 1


def test_pipeline_on_tiny_architectures(store, tiny_dirs):
    for arch, folder in tiny_dirs.items():
        out = run(ModelViewSpec(model=str(folder), prompt=PROMPT, top_k=3), store=store)
        assert len(out.result.table) == 3 and out.result.meta["model_summary"]["n_layers"] == 2
        assert run(ModelViewSpec(model=str(folder), prompt=PROMPT, top_k=3), store=store).hit


# -- export ---------------------------------------------------------------------------------------------------
def test_html_report_is_offline_and_escapes_user_text(store):
    evil = "<script>alert('x')</script> and </script><img src=x onerror=alert(1)>"
    out = run(ModelViewSpec(prompt=evil, top_k=5), store=store)
    doc = html_report(evil, [item_from_result(evil, "model", out.key, out.spec.to_dict(), out.result, notes=evil)])
    assert "<script>alert" not in doc and "<img src=x" not in doc
    assert htmllib.escape(evil) in doc  # shown as text
    # self-contained: plotly.js is inlined and nothing is fetched from elsewhere
    assert len(doc) > 3_000_000 and "Plotly" in doc
    assert not re.search(r"<script[^>]+src=", doc) and not re.search(r"<link[^>]+href=", doc)
    assert out.key in doc


def test_html_report_opens_in_a_browser_offline(store, tmp_path):
    """The report renders its figures in Chromium with the network switched off."""
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed")
    from playwright.sync_api import sync_playwright

    out = run(ModelViewSpec(prompt="<script>window.pwned=1</script> The capital of France is", top_k=5), store=store)
    path = tmp_path / "report.html"
    path.write_text(html_report("report", [item_from_result("t", "model", out.key, out.spec.to_dict(), out.result)]))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            ctx = browser.new_context(offline=True)
            page = ctx.new_page()
            page.goto(path.as_uri())
            page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
            assert page.locator(".js-plotly-plot").count() == 2
            assert page.evaluate("window.pwned") is None
        finally:
            browser.close()


# -- command line ---------------------------------------------------------------------------------------------
def _cli(*args, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_cli_runs_into_the_store_and_writes_outputs(tmp_path):
    db = tmp_path / "cli.duckdb"
    out = _cli("model", "--prompt", PROMPT, "--top-k", "4", "--store", str(db), "--csv", str(tmp_path / "o.csv"),
               "--html", str(tmp_path / "o.html"), "--parquet", str(tmp_path / "o.parquet"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("computed model ")
    assert len(pd.read_csv(tmp_path / "o.csv")) == 4 and len(pd.read_parquet(tmp_path / "o.parquet")) == 4
    assert "Plotly" in (tmp_path / "o.html").read_text()
    again = _cli("model", "--prompt", PROMPT, "--top-k", "4", "--store", str(db))
    assert again.stdout.startswith("hit model ")
    # the app's pipeline sees the CLI's result
    assert run(ModelViewSpec(prompt=PROMPT, top_k=4), store=Store(db)).hit


def test_cli_batch_from_json_file(tmp_path):
    specs = [{"analysis": "model", "prompt": f"The capital of {c} is", "top_k": 2} for c in ("France", "Japan")]
    (tmp_path / "batch.json").write_text(json.dumps(specs))
    out = _cli("model", "--spec", str(tmp_path / "batch.json"), "--store", str(tmp_path / "b.duckdb"),
               "--csv", str(tmp_path / "b.csv"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("computed model") == 2
    assert pd.read_csv(tmp_path / "b.csv")["run_key"].nunique() == 2


def test_cli_help_and_errors(tmp_path):
    out = _cli("--help")
    assert out.returncode == 0 and "model" in out.stdout and "import-store" in out.stdout
    out = _cli("model", "--help")
    assert "--top-k" in out.stdout and "--token-ids" in out.stdout and "--prompt" in out.stdout
    bad = _cli("model", "--prompt", PROMPT, "--top-k", "lots", "--store", str(tmp_path / "e.duckdb"))
    assert bad.returncode == 2 and "error: top_k" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_moves_stores_between_machines(tmp_path):
    a, b = tmp_path / "gpu.duckdb", tmp_path / "laptop.duckdb"
    assert _cli("model", "--prompt", PROMPT, "--store", str(a)).returncode == 0
    assert _cli("export-parquet", str(tmp_path / "exp"), "--store", str(a)).returncode == 0
    out = _cli("import-parquet", str(tmp_path / "exp"), "--store", str(b))
    assert out.returncode == 0 and json.loads(out.stdout)["runs"] == 1
    assert run(ModelViewSpec(prompt=PROMPT), store=Store(b), allow_compute=False).hit


def test_findings_export_together(store):
    from analysis.export import findings_report

    out = run(ModelViewSpec(prompt=PROMPT, top_k=3), store=store)
    store.add_finding("Capital <b>recall</b>", notes="Top-1 is Paris\n<script>x()</script>", author="ada",
                      runs=[out.key], links=["http://localhost:8501/?model=default&prompt=x"])
    store.add_finding("Second", author="bob")
    doc, csv = findings_report(store)
    assert "Capital &lt;b&gt;recall&lt;/b&gt;" in doc and "<script>x()" not in doc
    assert out.key in doc and doc.count("js-plotly-plot") + doc.count("Plotly.newPlot") >= 2
    table = pd.read_csv(__import__("io").BytesIO(csv))
    assert set(table["title"]) == {"Capital <b>recall</b>", "Second"}
    assert table.set_index("title").loc["Capital <b>recall</b>", "runs"] == out.key


def test_cli_patching_writes_the_tidy_table(tmp_path):
    out = _cli("patching", "--n-pairs", "2", "--components", "resid_pre,z_all_pos", "--methods", "activation,relp",
               "--store", str(tmp_path / "p.duckdb"), "--csv", str(tmp_path / "p.csv"), "--html", str(tmp_path / "p.html"))
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns) == ["method", "component", "layer", "pos", "head", "dest_pos", "value", "ci_low",
                                   "ci_high", "p_value", "p_min"]
    assert len(table) == 2 * (6 * 16 + 6 * 4)  # two methods x (resid_pre layer x pos + z layer x head)
    assert "Plotly" in (tmp_path / "p.html").read_text()
    bad = _cli("patching", "--components", "resid_middle", "--store", str(tmp_path / "p.duckdb"))
    assert bad.returncode == 2 and "must be one of" in bad.stderr


def test_cli_adds_a_concept_csv_and_probes_it(tmp_path):
    from analysis.concept_data import shipped

    db = tmp_path / "c.duckdb"
    shipped().iloc[:100][["text", "tense"]].to_csv(tmp_path / "tense.csv", index=False)
    out = _cli("add-concepts", str(tmp_path / "tense.csv"), "--store", str(db))
    assert out.returncode == 0, out.stderr
    ds = out.stdout.strip()
    assert len(ds) == 16
    probe = _cli("probes", "--dataset", ds, "--max-sentences", "100", "--store", str(db), "--csv", str(tmp_path / "p.csv"))
    assert probe.returncode == 0, probe.stderr
    assert set(pd.read_csv(tmp_path / "p.csv")["concept"]) == {"tense"}
    (tmp_path / "bad.csv").write_text("words,tense\na,past\n")
    bad = _cli("add-concepts", str(tmp_path / "bad.csv"), "--store", str(db))
    assert bad.returncode == 2 and "no 'text' column" in bad.stderr and "Traceback" not in bad.stderr


def test_every_command_has_help(capsys):
    """A '%' in a field's description broke `--help` (argparse formats help strings with %)."""
    from analysis.__main__ import _parser
    from analysis.registry import REGISTRY

    for name in REGISTRY:
        with pytest.raises(SystemExit) as e:
            _parser().parse_args([name, "--help"])
        assert e.value.code == 0, name
    assert "10% of the training" in " ".join(capsys.readouterr().out.split())
