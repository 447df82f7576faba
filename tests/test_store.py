"""The DuckDB result store: round trip, atomic writes, concurrency across threads and processes, migration."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from analysis.result import Result, RunRecord
from analysis.store import MIGRATIONS, SCHEMA_VERSION, Store

REPO = Path(__file__).resolve().parent.parent


def _result(seed: int = 0, n: int = 50) -> Result:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"layer": np.repeat(np.arange(n // 5), 5), "pos": np.tile(np.arange(5), n // 5),
                          "token": [f"tok<{i}>" for i in range(n)], "value": rng.normal(size=n)})
    side = pd.DataFrame({"k": ["a", "b"], "v": [1.5, -2.0]})
    return Result(table=table, meta={"seed": seed, "note": "x"}, extra={"side": side})


def _run(key: str, **kw) -> RunRecord:
    return RunRecord(key=key, analysis="test", spec={"a": 1, "key": key}, model="m", fingerprint="f" * 32,
                     version="1", **kw)


def test_round_trip(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    res = _result()
    store.put(_run("k1", author="ada", duration_s=1.25), res)
    got = store.get("k1")
    pd.testing.assert_frame_equal(got.table, res.table)
    pd.testing.assert_frame_equal(got.extra["side"], res.extra["side"])
    assert got.meta == res.meta
    rec = store.run("k1")
    assert rec.spec == {"a": 1, "key": "k1"} and rec.author == "ada" and rec.duration_s == 1.25
    assert store.get("missing") is None
    # the file holds Parquet bytes, not pickles
    with duckdb.connect(str(tmp_path / "s.duckdb")) as con:
        blob = con.execute("SELECT parquet FROM results WHERE key='k1' AND name='main'").fetchone()[0]
    assert bytes(blob[:4]) == b"PAR1"


def test_failed_write_leaves_nothing(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    bad = Result(table=pd.DataFrame({"x": [1, 2]}), extra={"side": pd.DataFrame({"y": [object()]})})  # not Parquet-able
    with pytest.raises(Exception):
        store.put(_run("k-bad"), bad)
    assert store.get("k-bad") is None and store.count("runs") == 0 and store.count("results") == 0


def test_interrupted_transaction_leaves_nothing(tmp_path):
    """A process killed in the middle of a put leaves no run row and no partial tables."""
    path = tmp_path / "s.duckdb"
    Store(path)
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from analysis import store as S
import pandas as pd
st = S.Store({str(path)!r})
def write(con):
    con.execute("INSERT INTO runs (key, analysis, spec, model, fingerprint, version, created, status) "
                "VALUES ('k', 'a', '{{}}', 'm', 'f', '1', now(), 'done')")
    con.execute("INSERT INTO results VALUES ('k', 'main', 1, 'x'::BLOB)")
    os._exit(9)   # killed mid-transaction
st._transaction(write)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    store = Store(path)
    assert store.count("runs") == 0 and store.count("results") == 0


def test_threads_write_and_read_concurrently(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    errors = []

    def writer(i):
        try:
            for j in range(10):
                store.put(_run(f"t{i}-{j}"), _result(seed=i * 100 + j, n=20))
                assert store.get(f"t{i}-{j}") is not None
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count("runs") == 60 and store.count("results") == 120
    assert store.get("t3-7").meta["seed"] == 307


def test_second_process_writes_while_this_one_reads_and_writes(tmp_path):
    path = tmp_path / "s.duckdb"
    store = Store(path)
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / "tests")!r})
from analysis.store import Store
from test_store import _result, _run
st = Store({str(path)!r})
for j in range(40):
    st.put(_run(f"p-{{j}}"), _result(seed=j, n=20))
print("ok")
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for j in range(40):
        store.put(_run(f"m-{j}"), _result(seed=1000 + j, n=20))
        store.get(f"m-{j}")
        store.runs()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "ok" in out, err
    keys = set(store.runs()["key"])
    assert {f"p-{j}" for j in range(40)} <= keys and {f"m-{j}" for j in range(40)} <= keys
    assert store.get("p-39").meta["seed"] == 39


def test_old_schema_store_migrates(tmp_path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # a store as version 1 wrote it, with a run in it
        for sql in MIGRATIONS[0]:
            con.execute(sql)
        con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        con.execute("INSERT INTO runs VALUES ('old', 'test', '{\"a\": 1}', 'm', 'f', '1', now(), 0.5, 'done', '{}')")
        con.execute("INSERT INTO results VALUES ('old', 'main', 1, ?)",
                    [__import__("analysis.result", fromlist=["to_parquet"]).to_parquet(pd.DataFrame({"x": [7]}))])
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get("old").table["x"].tolist() == [7]
    assert store.run("old").author == ""
    assert store.count("findings") == 0


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    Store(path)
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    from analysis import WorkbenchError

    with pytest.raises(WorkbenchError, match="newer version"):
        Store(path)


def test_findings_round_trip(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    fid = store.add_finding("Name movers in L5", notes="<script>alert(1)</script>", author="ada",
                            runs=["k1"], links=["http://localhost:8501/?model=default"])
    df = store.findings()
    assert df.loc[0, "id"] == fid and df.loc[0, "runs"] == ["k1"] and df.loc[0, "notes"].startswith("<script>")
    from analysis import WorkbenchError

    with pytest.raises(WorkbenchError, match="needs a title"):
        store.add_finding("  ")
    assert store.count("findings") == 1


def _no_check(row):
    """These runs have made-up keys; tests/test_trust.py checks imports with the runner's key check."""


def test_import_store_file_and_parquet_folder(tmp_path):
    batch = Store(tmp_path / "batch.duckdb")  # e.g. written by a batch job on a GPU machine
    batch.put(_run("b1"), _result(seed=1))
    batch.remember_model("default", "", "float32", "f" * 32, {"n_layers": 6})
    batch.add_finding("from the batch")
    ds = batch.put_dataset(pd.DataFrame({"text": ["a", "b"], "mood": ["x", "y"]}), name="m.csv", kind="concepts")
    app = Store(tmp_path / "app.duckdb")
    app.put(_run("a1"), _result(seed=2))
    added = app.import_store(tmp_path / "batch.duckdb", check_run=_no_check)
    assert added == {"runs": 1, "results": 2, "findings": 1, "models": 1, "datasets": 1}
    assert app.get("b1").meta["seed"] == 1 and app.get("a1").meta["seed"] == 2
    assert list(app.get_dataset(ds)["mood"]) == ["x", "y"]  # an uploaded dataset travels with the runs
    assert app.import_store(tmp_path / "batch.duckdb", check_run=_no_check) == {"runs": 0, "results": 0, "findings": 0, "models": 0,
                                                           "datasets": 0}

    batch.put(_run("b2"), _result(seed=3))
    batch.export_parquet(tmp_path / "export")
    added = app.import_parquet(tmp_path / "export", check_run=_no_check)
    assert added["runs"] == 1 and app.get("b2").meta["seed"] == 3
    pd.testing.assert_frame_equal(app.get("b2").table, _result(seed=3).table)
    from analysis import WorkbenchError

    with pytest.raises(WorkbenchError, match="not an exported store"):
        app.import_parquet(tmp_path, check_run=_no_check)
    with pytest.raises(WorkbenchError, match="no store file"):
        app.import_store(tmp_path / "nope.duckdb", check_run=_no_check)
