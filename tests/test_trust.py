"""Trust defects found by using the workbench as a team would (issue 15): concurrent writers, imported files
that are not what they claim, restrictions of a shared deployment, hostile text. Each test failed before its
fix."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store import _result, _run

from analysis import WorkbenchError
from analysis.runner import check_run_key, run, run_key
from analysis.store import Store

REPO = Path(__file__).resolve().parent.parent


def _no_check(row):
    """Store-level tests use made-up run keys; the key check itself is tested with real runs below."""


# -- concurrent writers ---------------------------------------------------------------------------------------
def _record_everything(path: Path, i: int) -> None:
    st = Store(path)  # a Store object per writer, as separate sessions and processes have
    st.remember_model("default", "", "float32", "f" * 32, {"n_layers": 2})
    st.put(_run("same-key"), _result(seed=0))
    st.put_dataset(pd.DataFrame({"text": ["a", "b"], "mood": ["x", "y"]}), name="m.csv", kind="concepts")
    st.add_finding(f"finding {i}")


def test_threads_and_a_process_recording_the_same_model_and_run_at_once(tmp_path):
    """Four browser sessions on a fresh store showed `Duplicate key "model: default ..."`: two runs recorded the
    same model at the same time. Every racing write is an idempotent upsert."""
    path = tmp_path / "s.duckdb"
    Store(path)
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
            "from test_trust import _record_everything\nfrom pathlib import Path\n"
            f"for i in range(5): _record_everything(Path({str(path)!r}), 100 + i)\nprint('ok')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors, barrier = [], threading.Barrier(8)

    def worker(i):
        try:
            barrier.wait()
            for j in range(3):
                _record_everything(path, i * 10 + j)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out, err = proc.communicate(timeout=300)
    assert errors == [] and proc.returncode == 0, (errors, err[-2000:])
    st = Store(path)
    assert st.count("models") == 1 and st.count("runs") == 1 and st.count("results") == 2
    assert st.count("datasets") == 1 and st.count("findings") == 8 * 3 + 5
    assert st.get("same-key").meta["seed"] == 0


# -- importing files that are not what they claim --------------------------------------------------------------
@pytest.fixture()
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("root:x:0:0:the server's secret\n")
    return path


def _exported(tmp_path) -> Path:
    src = Store(tmp_path / "src.duckdb")
    src.put(_run("b1"), _result(seed=1))
    src.add_finding("a real finding")
    src.export_parquet(tmp_path / "export")
    return tmp_path / "export"


def test_import_parquet_does_not_paste_column_names_into_sql(tmp_path, secret):
    folder = _exported(tmp_path)
    evil = (f"id, title, notes, author, runs, links, created) SELECT 'abc', 'pwned', content, '', '[]', '[]', "
            f"now()::TIMESTAMP FROM read_text('{secret}') --")
    pq.write_table(pa.table({evil: ["x"]}), folder / "findings.parquet")
    app = Store(tmp_path / "app.duckdb")
    with pytest.raises(WorkbenchError, match="unexpected columns"):
        app.import_parquet(folder, check_run=_no_check)
    assert app.count("findings") == 0 and app.count("runs") == 0  # refused whole: nothing changed


def test_import_store_reads_tables_never_views(tmp_path, secret):
    path = tmp_path / "evil.duckdb"
    Store(path).put(_run("b1"), _result(seed=1))
    with duckdb.connect(str(path)) as con:
        con.execute("DROP TABLE findings")
        con.execute(f"CREATE VIEW findings AS SELECT 'abcd' AS id, 'pwned' AS title, content AS notes, '' AS author, "
                    f"'[]' AS runs, '[]' AS links, now()::TIMESTAMP AS created FROM read_text('{secret}')")
    app = Store(tmp_path / "app.duckdb")
    with pytest.raises(WorkbenchError, match="view"):
        app.import_store(path, check_run=_no_check)
    assert app.count("findings") == 0 and app.count("runs") == 0
    assert "secret" not in app.findings().to_string()


def test_import_store_skips_malformed_rows_and_keeps_the_good_ones(tmp_path):
    path = tmp_path / "mixed.duckdb"
    src = Store(path)
    src.put(_run("good"), _result(seed=1))
    src.add_finding("fine")
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO findings VALUES ('00ff', 'broken runs', '', '', 'not json', '[]', now())")
        con.execute("INSERT INTO findings VALUES ('00fe', '', 'no title', '', '[]', '[]', now())")
        con.execute("INSERT INTO runs (key, analysis, spec, model, fingerprint, version, created, status) "
                    "VALUES ('junk', 'test', '{}', 'm', 'f', '1', now(), 'done')")
        con.execute("INSERT INTO results VALUES ('junk', 'main', 1, 'PAR1 not really'::BLOB)")
        con.execute("INSERT INTO results VALUES ('orphan', 'main', 1, 'x'::BLOB)")
    app = Store(tmp_path / "app.duckdb")
    added = app.import_store(path, check_run=_no_check)
    assert {k: added[k] for k in ("runs", "results", "findings")} == {"runs": 1, "results": 2, "findings": 1}
    assert added["skipped"] == {"findings": 2, "results": 2, "runs": 1}
    assert any("not JSON" in w for w in added["why"])
    assert app.get("good").meta["seed"] == 1 and app.get("junk") is None
    assert list(app.findings()["title"]) == ["fine"]  # the Findings page reads this
    # a second file cannot add a table to a run the store already holds
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO results SELECT key, 'planted', n_rows, parquet FROM results "
                    "WHERE key = 'good' AND name = 'main'")
    again = app.import_store(path, check_run=_no_check)
    assert again["results"] == 0 and set(app.get("good").extra) == {"side"}


def test_import_refuses_more_rows_than_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.duckdb"
    src = Store(path)
    for i in range(12):
        src.add_finding(f"f{i}")
    monkeypatch.setenv("WORKBENCH_IMPORT_MAX_ROWS", "10")
    app = Store(tmp_path / "app.duckdb")
    with pytest.raises(WorkbenchError, match="at most 10"):
        app.import_store(path, check_run=_no_check)
    assert app.count("findings") == 0


def test_imported_runs_cannot_claim_another_runs_key(tmp_path):
    """A row under a real run key must be that run: its key is the hash of its fingerprint, spec and version."""
    from analysis.analyses.model_view.spec import ModelViewSpec

    src = Store(tmp_path / "src.duckdb")
    honest = run(ModelViewSpec(prompt="The capital of France is"), store=src)
    other = run(ModelViewSpec(prompt="Two plus two is"), store=Store(tmp_path / "elsewhere.duckdb"))
    check_run_key({"key": honest.key, "analysis": "model", "spec": json.dumps(honest.record.spec),
                   "fingerprint": honest.record.fingerprint, "version": honest.record.version})
    # plant the first run's result under the second run's key
    with duckdb.connect(str(tmp_path / "src.duckdb")) as con:
        con.execute("UPDATE results SET key = ? WHERE key = ?", [other.key, honest.key])
        con.execute("UPDATE runs SET key = ? WHERE key = ?", [other.key, honest.key])
    app = Store(tmp_path / "app.duckdb")
    added = app.import_store(tmp_path / "src.duckdb", check_run=check_run_key)
    assert added["runs"] == 0 and added["skipped"]["runs"] == 1 and "hash" in added["why"][0]
    assert app.get(other.key) is None
    assert run_key(other.record.fingerprint, other.spec, other.record.version) == other.key


# -- hostile text in every output -------------------------------------------------------------------------------
PIXEL = "![x](http://tracker.example/pixel.png)"
FORMULAS = ["=HYPERLINK(\"http://evil.example\",\"x\")", "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def _csv_cells(data: bytes) -> list[str]:
    import csv
    import io

    return [c for row in csv.reader(io.StringIO(data.decode(), newline="")) for c in row]


def test_csv_neutralises_spreadsheet_formulas_in_every_cell_and_header():
    from analysis.export import to_csv

    df = pd.DataFrame({"text": FORMULAS + ["plain"], "=label": ["a"] * 7, "value": [-1.5] * 7})
    cells = _csv_cells(to_csv(df))
    assert not [c for c in cells if c.startswith(("=", "+", "@", "\t", "\r")) or c.startswith("-") and c != "-1.5"]
    assert "'=HYPERLINK(\"http://evil.example\",\"x\")" in cells and "'=label" in cells and "-1.5" in cells


def test_findings_export_and_cli_csv_carry_no_formulas_live_links_or_images(tmp_path):
    from analysis.analyses.model_view.spec import ModelViewSpec
    from analysis.export import findings_report

    store = Store(tmp_path / "s.duckdb")
    out = run(ModelViewSpec(prompt="=1+1 is"), store=store)
    app = "http://localhost:8501/"
    store.add_finding(f"=cmd {PIXEL}", notes=f"see {PIXEL} and [here](http://elsewhere.example)", author=PIXEL,
                      runs=[out.key], links=["javascript:alert(1)"])
    store.add_finding("ours", links=[f"{app}?model=default&prompt=x"])
    doc, csv = findings_report(store, app)
    assert "<img" not in doc and 'href="javascript' not in doc and "href=\"http://elsewhere" not in doc
    assert f'href="{app}?model=default&amp;prompt=x"' in doc  # a link into the app stays live
    assert "<code>javascript:alert(1)</code>" in doc
    assert not [c for c in _csv_cells(csv) if c.startswith(("=", "+", "-", "@"))]
    cli = subprocess.run([sys.executable, "-m", "analysis", "lens", "--prompt", "=1+1 is", "--store",
                          str(tmp_path / "s.duckdb"), "--csv", str(tmp_path / "m.csv")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    cells = _csv_cells((tmp_path / "m.csv").read_bytes())  # the prompt's tokens, one row per layer and position
    assert "'=" in cells and not [c for c in cells if c.startswith(("=", "+", "@"))]


def test_markdown_escape_shows_text_as_typed():
    from markdown_it import MarkdownIt

    from analysis.untrusted import md_escape

    md = MarkdownIt("commonmark")
    for text in (PIXEL, "[a](javascript:alert(1))", "<img src=http://x/p.png>", "see http://x.example/p now",
                 "mail ada@example.org or www.example.org",
                 ":red[alarm] :material/home:", "# heading *bold* `code`"):
        rendered = md.render(md_escape(text))
        assert "<img" not in rendered and "<a" not in rendered and "<h1" not in rendered and "<em" not in rendered
        shown = rendered.replace("&quot;", '"')
        assert text.replace("<", "&lt;").replace(">", "&gt;") in shown.replace("\u200b", "")  # as typed
        # no GFM autolink literal either (Streamlit links "http://..." even when its characters are escaped)
        assert "://" not in shown and "www." not in shown and not re.search(r"\w@", shown)


# -- a shared deployment's restrictions, wherever a model is named ---------------------------------------------
def test_restrictions_are_enforced_where_a_model_loads(tiny_dirs, monkeypatch, tmp_path):
    from analysis import load_model
    from analysis.analyses.entropy.compute import EntropySpec
    from analysis.analyses.infoplane.compute import InfoPlaneSpec
    from analysis.models import MODEL_CACHE

    folder = str(tiny_dirs["llama"])
    load_model("default")  # loaded before counting: only a refused model could add a load below
    loads = MODEL_CACHE.loads
    monkeypatch.setenv("WORKBENCH_ALLOW_LOCAL_FOLDERS", "0")
    store = Store(tmp_path / "s.duckdb")
    messages = set()
    for attempt in (lambda: load_model(folder), lambda: load_model("/no/such/folder"),
                    lambda: load_model(folder + "/../llama"), lambda: load_model("~/model.gguf"),
                    lambda: run(EntropySpec(prompt="Hello there", checkpoints=(folder,)), store=store),
                    lambda: run(InfoPlaneSpec(checkpoints=("default", "/etc"), n_samples=50), store=store)):
        with pytest.raises(WorkbenchError) as e:
            attempt()
        messages.add(str(e.value))
    assert len(messages) == 1  # the same words whether or not the path exists: nothing about the server leaks
    assert MODEL_CACHE.loads == loads and store.count("runs") == 0
    assert load_model("data/checkpoints/step-02000").summary.n_layers == 6  # the shipped models stay open
    cli = subprocess.run([sys.executable, "-m", "analysis", "entropy", "--prompt", "Hi", "--checkpoints", folder, "--store",
                          str(tmp_path / "s.duckdb")], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "WORKBENCH_ALLOW_LOCAL_FOLDERS": "0"})
    assert cli.returncode == 2 and "not folders or files on the server" in cli.stderr and "Traceback" not in cli.stderr
    monkeypatch.setenv("WORKBENCH_ALLOW_LOCAL_FOLDERS", "1")
    with pytest.raises(WorkbenchError, match="trust_remote_code"):
        load_model(folder, trust_remote_code=True)
    monkeypatch.setenv("WORKBENCH_REVIEW_MODE", "1")
    with pytest.raises(WorkbenchError, match="Review mode"):
        load_model("default")


def test_checkpoint_labels_are_training_steps_or_names_in_the_order_given(tmp_path):
    """`step-02000, default` labelled the final model "step 1" (its place in the list) and sorted it first."""
    from analysis.analyses.entropy.compute import EntropySpec
    from analysis.models import checkpoint_series

    out = run(EntropySpec(prompt="John gave a ring to", checkpoints=("data/checkpoints/step-02000", "default")),
              store=Store(tmp_path / "s.duckdb"))
    assert out.result.meta["checkpoints"] == ["step 2000", "step 4000"] and out.result.meta["steps"] == [2000, 4000]
    assert list(out.result.extra["over_training"]["checkpoint"]) == ["step 2000", "step 4000"]
    series = checkpoint_series("default", "", ["EleutherAI/pythia-70m@step3000", "gpt2", "gpt2", "default"])
    assert [c.label for c in series] == ["step 3000", "gpt2", "gpt2 (2)", "step 4000"]
    assert [c.step for c in series] == [3000, None, None, 4000] and series[0].revision == "step3000"


# -- results computed concurrently equal single-user results ----------------------------------------------------
def test_a_float16_load_does_not_change_a_concurrent_run(tiny_dirs, default_handle):
    """Loading a float16 checkpoint set torch's process-wide default dtype while transformers built it, so a lens
    run in another thread was computed (and stored) in float16."""
    import time

    import torch

    from analysis import models
    from analysis.session import ModelSession

    ids = [[1, 5, 9, 13, 2, 7]]
    with ModelSession(default_handle) as s:
        baseline = s.forward(s.tensor(ids[0]))
    stop, seen, diffs, errors = threading.Event(), set(), [], []

    def loader():
        try:
            req = models._resolve_request(str(tiny_dirs["llama"]), None, "cpu", "float16", False)
            while not stop.is_set():
                models._load(req)  # a fresh build every time (the cache is bypassed)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t = threading.Thread(target=loader)
    t.start()
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            with ModelSession(default_handle) as s:
                seen.add(torch.get_default_dtype())
                made = torch.zeros(3)  # a tensor made without a dtype, as much code does
                seen.add(made.dtype)
                diffs.append((s.forward(s.tensor(ids[0])) - baseline).abs().max().item())
            time.sleep(0.01)  # let the loader in between runs
    finally:
        stop.set()
        t.join(timeout=120)
    assert errors == [] and seen == {torch.float32} and max(diffs) == 0.0


# -- store errors: what the disk refuses is not a lock conflict; review mode only reads -------------------------
def test_a_full_disk_is_reported_at_once_not_retried_as_a_lock_conflict(tmp_path):
    """Disk-full errors were retried for 60 s as if another process held the file, then shown as a traceback."""
    path = tmp_path / "s.duckdb"
    Store(path)
    code = f"""
import json, resource, signal, sys, time
sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
from analysis import WorkbenchError
from analysis.store import Store
from test_store import _result, _run
store = Store({str(path)!r}, timeout_s=60)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, as a full disk fails
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
t0 = time.monotonic()
try:
    store.put(_run("big"), _result(n=200_000))
    print(json.dumps({{"error": None}}))
except WorkbenchError as e:
    print(json.dumps({{"error": str(e), "seconds": time.monotonic() - t0}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] and "disk refused" in out["error"] and out["seconds"] < 10, out
    assert Store(path).get("big") is None  # nothing half-written


def test_review_mode_reads_a_store_another_reader_holds_and_writes_nothing(tmp_path):
    path = tmp_path / "s.duckdb"
    Store(path).put(_run("k1"), _result(seed=4))
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time\n"
                               f"con = duckdb.connect({str(path)!r}, read_only=True)\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkbenchError, match="busy"):
            Store(path, timeout_s=2)  # a read-write open waits for the other reader: what review mode did before
        review = Store(path, timeout_s=2, read_only=True)
        assert list(review.runs()["key"]) == ["k1"] and review.get("k1").meta["seed"] == 4
        with pytest.raises(WorkbenchError, match="writes nothing"):
            review.add_finding("not here")
    finally:
        holder.kill()
        holder.wait()
    assert Store(path).count("findings") == 0
    with pytest.raises(WorkbenchError, match="No results have been stored yet"):
        Store(tmp_path / "none.duckdb", read_only=True).runs()
    assert not (tmp_path / "none.duckdb").exists()


# -- one user cannot hold the server -------------------------------------------------------------------------------
def test_a_run_stopped_by_its_progress_callback_stores_nothing_and_frees_the_model(default_handle, tmp_path):
    """The app's progress callback stops a run whose browser tab has closed (a run nobody waits for no longer
    holds the model lock); whatever stops it, nothing is stored and the model is left as it was."""
    from analysis.analyses.patching.spec import PatchingSpec
    from analysis.errors import RunCancelled
    from analysis.session import module_state

    store, before, calls = Store(tmp_path / "s.duckdb"), module_state(default_handle), []

    def leave(frac, what):
        calls.append(what)
        if len(calls) == 3:  # mid-sweep
            raise RunCancelled("The browser tab that asked for this run has closed; it was stopped.")

    spec = PatchingSpec(n_pairs=4, components=("resid_pre", "z_by_pos"), methods=("activation", "atp"))
    with pytest.raises(RunCancelled):
        run(spec, store=store, progress=leave)
    assert store.count("runs") == 0 and store.count("results") == 0
    assert default_handle.lock.acquire(timeout=1)  # released
    default_handle.lock.release()
    assert module_state(default_handle) == before  # hooks, requires_grad and train/eval put back
    assert run(spec, store=store).result.table["value"].notna().all()


def test_lens_runs_beside_a_quantization_run_equal_single_user_runs(tmp_path):
    """quant's model_text and weight_units ran the model without its lock: 164 of 3,357 lens runs computed beside
    them were silently wrong. Every computation now runs in the model's session."""
    from analysis.analyses.lens.spec import LensSpec
    from analysis.analyses.quant.compute import QuantSensitivitySpec

    prompts = ["The capital of France is", "The weather is very", "Two plus two is", "The concert was very"]
    alone = {p: run(LensSpec(prompt=p), store=Store(tmp_path / "alone.duckdb")).result.table for p in prompts}
    shared, errors, results = Store(tmp_path / "shared.duckdb"), [], []

    def quant():
        try:
            run(QuantSensitivitySpec(formats=("int8-channel", "int4-channel"), n_seqs=2, seq_len=16, max_samples=4,
                                     seed=3), store=shared)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def lens(i):
        try:
            for p in prompts:
                out = run(LensSpec(prompt=p, top_k=5 + i), store=shared)  # its own run, computed now
                results.append((p, out.result.table))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=quant), *[threading.Thread(target=lens, args=(i,)) for i in range(3)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for p, table in results:
        cols = ["entropy", "kl_to_final", "top_prob", "final_prob"]
        assert (table[cols].to_numpy() == alone[p][cols].to_numpy()).all(), p


def test_a_long_run_lets_a_waiting_run_in_between_its_parts(tmp_path):
    """A long patching run held the model for its whole length while others waited; now a short run that starts
    during it gets the model between two of its sweeps, and both results equal single-user runs."""
    import time

    from analysis.analyses.lens.spec import LensSpec
    from analysis.analyses.patching.spec import PatchingSpec

    long_spec = PatchingSpec(n_pairs=6, components=("resid_pre", "z_by_pos", "pattern_by_pos", "attn_out"),
                             methods=("activation", "atp"))
    short_spec = LensSpec(prompt="The capital of Japan is")
    alone = Store(tmp_path / "alone.duckdb")
    long_alone = run(long_spec, store=alone)
    short_alone = run(short_spec, store=alone)
    shared, done, errors, computing = Store(tmp_path / "shared.duckdb"), {}, [], threading.Event()

    def progress(frac, what):  # the long run is inside its session, sweeping
        if 0.05 < frac < 1:
            computing.set()

    def go(name, spec, wait):
        try:
            if wait:
                assert computing.wait(timeout=300)
            out = run(spec, store=shared, progress=None if wait else progress)
            done[name] = (time.perf_counter(), out)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=go, args=("long", long_spec, False)),
               threading.Thread(target=go, args=("short", short_spec, True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert done["short"][0] < done["long"][0]  # it did not wait for the whole long run
    assert (done["long"][1].result.table["value"].to_numpy() == long_alone.result.table["value"].to_numpy()).all()
    cols = ["entropy", "kl_to_final", "top_prob"]
    assert (done["short"][1].result.table[cols].to_numpy() == short_alone.result.table[cols].to_numpy()).all()


def test_letting_others_in_is_skipped_while_the_lock_is_held_twice(default_handle):
    """A session nested in another on the same model holds the re-entrant lock twice: releasing once would free
    nothing, so let_others_in returns at once instead of waiting for a waiter that cannot get in."""
    import time

    from analysis.session import ModelSession

    got_in = threading.Event()

    def waiter():
        with ModelSession(default_handle):
            got_in.set()

    with ModelSession(default_handle) as outer:
        with ModelSession(default_handle):
            t = threading.Thread(target=waiter)
            t.start()
            while not default_handle.turns.waiting:
                time.sleep(0.01)
            t0 = time.perf_counter()
            outer.let_others_in(wait_s=30)
            assert time.perf_counter() - t0 < 1 and not got_in.is_set()
        outer.let_others_in(wait_s=30)  # held once now: the waiter goes first
        assert got_in.is_set()
    t.join()
    assert default_handle.turns.holds == 0
