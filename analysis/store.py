"""The result store: one DuckDB file holding runs, their tidy result tables and findings.

    store = Store()                                 # WORKBENCH_STORE or ~/.cache/interp-workbench/store.duckdb
    store.put(run, result)                          # one transaction: the run row and its tables, or nothing
    store.get(key)                                  # -> Result | None

Concurrency. DuckDB lets one process at a time hold a database file open, and threads in that process share it.
The store therefore never keeps a connection: every operation opens the file, does its work in one
transaction and closes it, retrying with jittered backoff while another process holds the lock (a batch job
writing while the app reads) or while another thread's transaction conflicts. A write either lands whole or
not at all; writes of the same run key are idempotent (results are a pure function of the key).

Tables are stored as Parquet bytes (never pickle): each result table is one BLOB row in `results`.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb
import pandas as pd

from . import store_import
from .errors import WorkbenchError
from .result import Result, RunRecord, from_parquet, to_parquet

SCHEMA_VERSION = 5

# Each entry upgrades the schema from version i to i + 1. Never edit a released step; add a new one.
MIGRATIONS: list[list[str]] = [
    [  # 0 -> 1: runs and results
        "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        """CREATE TABLE IF NOT EXISTS runs (
            key VARCHAR PRIMARY KEY, analysis VARCHAR NOT NULL, spec VARCHAR NOT NULL, model VARCHAR NOT NULL,
            fingerprint VARCHAR NOT NULL, version VARCHAR NOT NULL, created TIMESTAMP NOT NULL,
            duration_s DOUBLE, status VARCHAR NOT NULL, metadata VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS results (
            key VARCHAR NOT NULL, name VARCHAR NOT NULL, n_rows BIGINT NOT NULL, parquet BLOB NOT NULL,
            PRIMARY KEY (key, name))""",
    ],
    [  # 1 -> 2: who ran it, findings, and the models seen (so review mode can find results without loading)
        "ALTER TABLE runs ADD COLUMN author VARCHAR DEFAULT ''",
        """CREATE TABLE IF NOT EXISTS findings (
            id VARCHAR PRIMARY KEY, title VARCHAR NOT NULL, notes VARCHAR NOT NULL, author VARCHAR NOT NULL,
            runs VARCHAR NOT NULL, links VARCHAR NOT NULL, created TIMESTAMP NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS models (
            model VARCHAR NOT NULL, revision VARCHAR NOT NULL, dtype VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL,
            summary VARCHAR NOT NULL, updated TIMESTAMP NOT NULL, PRIMARY KEY (model, revision, dtype))""",
    ],
    [  # 2 -> 3: datasets users bring (concept CSVs), content-addressed so a link naming one replays it
        """CREATE TABLE IF NOT EXISTS datasets (
            id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, kind VARCHAR NOT NULL, n_rows BIGINT NOT NULL,
            columns VARCHAR NOT NULL, parquet BLOB NOT NULL, author VARCHAR NOT NULL, created TIMESTAMP NOT NULL)""",
    ],
    [  # 3 -> 4: where each run was computed (a batch's Ray node), and batches in progress for the Runs page
        "ALTER TABLE runs ADD COLUMN worker VARCHAR DEFAULT ''",
        """CREATE TABLE IF NOT EXISTS batches (
            id VARCHAR PRIMARY KEY, executor VARCHAR NOT NULL, status VARCHAR NOT NULL, total BIGINT NOT NULL,
            done BIGINT NOT NULL, hits BIGINT NOT NULL, failed BIGINT NOT NULL, created TIMESTAMP NOT NULL,
            updated TIMESTAMP NOT NULL)""",
    ],
    [  # 4 -> 5: this machine's pace, for time estimates (analysis/estimate.py): its speed probes, and each finished
        # run's predicted seconds against its measured ones (neither is a result: not exported or imported)
        """CREATE TABLE IF NOT EXISTS speed_probes (
            machine VARCHAR NOT NULL, dtype VARCHAR NOT NULL, width BIGINT NOT NULL, flops_per_s DOUBLE NOT NULL,
            op_s DOUBLE NOT NULL, bytes_per_s DOUBLE NOT NULL, created TIMESTAMP NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS run_timings (
            key VARCHAR NOT NULL, analysis VARCHAR NOT NULL, machine VARCHAR NOT NULL, model VARCHAR NOT NULL,
            dtype VARCHAR NOT NULL, width BIGINT NOT NULL, flops DOUBLE NOT NULL, blocks DOUBLE NOT NULL,
            extra_s DOUBLE NOT NULL, predicted_s DOUBLE NOT NULL, measured_s DOUBLE NOT NULL,
            created TIMESTAMP NOT NULL)""",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION
TABLES = store_import.TABLES
_NOW = "now()::TIMESTAMP"


def _timing_row(run: RunRecord, result: Result) -> list | None:
    """The run_timings row of a computed run: what its result's estimate says of the machine's pace
    (runner.compute_run puts it there), when the run had the model to itself."""
    t = (result.meta.get("estimate") or {}).get("timing")
    if not isinstance(t, dict) or not t.get("clean"):
        return None
    try:
        return [run.key, str(t["analysis"] or run.analysis), str(t["machine"]), str(t["model"]), str(t["dtype"]),
                int(t["width"]), float(t["flops"]), float(t["blocks"]), float(t["extra_s"]), float(t["predicted_s"]),
                float(t["measured_s"])]
    except (KeyError, TypeError, ValueError):
        return None


def default_store_path() -> Path:
    env = os.environ.get("WORKBENCH_STORE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "interp-workbench" / "store.duckdb"


def _sql_str(path: Path) -> str:
    """A path inside a single-quoted SQL literal (COPY takes no parameters)."""
    return path.as_posix().replace("'", "''")


_IO_FAULTS = ("no space left", "read-only file system", "permission denied", "disk quota", "input/output error",
              "file too large", "attached in read-only mode")
MAX_KEY_RACES = 20  # retries of a transaction that lost a race to insert the same key


def _io_fault(e: Exception) -> bool:
    """The disk refused (full, read-only, no permission): waiting will not help."""
    return any(s in str(e).lower() for s in _IO_FAULTS)


def _lock_conflict(e: Exception) -> bool:
    """Another process holds the file, or another thread's transaction touched the same rows: retry."""
    text = str(e).lower()
    return not _io_fault(e) and ("could not set lock" in text or "conflict" in text or "database is locked" in text)


def _key_race(e: Exception) -> bool:
    """Two transactions inserted the same key at once (two sessions recording the same model or run): the loser
    retries, and then finds the winner's row (every racing write replaces or ignores an existing row)."""
    return isinstance(e, (duckdb.ConstraintException, duckdb.TransactionException)) and \
        "duplicate key" in str(e).lower()


class Store:
    """The DuckDB result store. Safe to share between threads and to use from several processes at once."""

    def __init__(self, path: str | Path | None = None, *, timeout_s: float | None = None, read_only: bool = False):
        """read_only: open the file read-only (review mode): nothing is created or migrated, several readers
        share the file, and any write is refused with a message."""
        self.path = Path(path) if path is not None else default_store_path()
        # how long to wait for another process's hold on the file (WORKBENCH_STORE_TIMEOUT_S, default 60 s)
        self.timeout_s = float(os.environ.get("WORKBENCH_STORE_TIMEOUT_S", 60)) if timeout_s is None else timeout_s
        self.read_only = read_only
        self.hits = 0  # counters for the "hit or computed" log (per Store object)
        self.misses = 0
        self._counter_lock = threading.Lock()
        self._local = threading.local()  # the connection of an open session(), per thread
        self._remembered: set[tuple] = set()  # model records known to be stored (saves a read per run)
        if read_only:
            if self.path.is_file() and self.schema_version() < SCHEMA_VERSION:
                raise WorkbenchError(f"The result store {self.path} was written by an older version of the "
                                     "workbench.", hint="Open it once with a computing app or the CLI to upgrade it.")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # -- connections ------------------------------------------------------------------------------------------
    def _retry(self, attempt, what: str):
        """attempt() until it succeeds, retrying with jittered backoff while another process holds the file or
        another thread's transaction conflicts; past the deadline, a WorkbenchError that says so."""
        deadline, delay, races = time.monotonic() + self.timeout_s, 0.005, 0
        while True:
            try:
                return attempt()
            except duckdb.Error as e:
                if _key_race(e) and races < MAX_KEY_RACES:
                    races += 1
                elif self.read_only and "attached in read-only mode" in str(e).lower():
                    raise WorkbenchError("Review mode reads the result store and writes nothing to it.",
                                         hint="Save findings and run analyses in a computing app.") from e
                elif _io_fault(e):
                    raise WorkbenchError(f"The result store {self.path} could not {what}: the disk refused ({e}).",
                                         hint="Free space on that disk, or point WORKBENCH_STORE at a writable file "
                                              "(a read-only store can be browsed with WORKBENCH_REVIEW_MODE=1).") from e
                elif not _lock_conflict(e):
                    raise WorkbenchError(f"The result store {self.path} could not {what}: {e}") from e
                elif time.monotonic() > deadline:
                    raise WorkbenchError(
                        f"The result store {self.path} is busy: another process has held it for over "
                        f"{self.timeout_s:g} s.", hint="Wait for the other job (a batch run, another app) to finish, "
                                                      "or point WORKBENCH_STORE at another file.") from e
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.25)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.read_only and not self.path.is_file():
            raise WorkbenchError("No results have been stored yet (review mode reads a result store and creates "
                                 "none).", hint="Run analyses in a computing app or with the CLI first.")
        con = self._retry(lambda: duckdb.connect(str(self.path), read_only=self.read_only), "be opened")
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Do several operations on one open of the file (opening a DuckDB file costs ~25 ms).

        Keep sessions short: while one is open, other processes wait for the file."""
        if getattr(self._local, "con", None) is not None:
            yield
            return
        with self._connect() as con:
            self._local.con = con
            try:
                yield
            finally:
                self._local.con = None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = getattr(self._local, "con", None)
        if con is not None:
            yield con
        else:
            with self._connect() as con:
                yield con

    def _transaction(self, fn):
        """Run fn(con) in one transaction, retrying the whole of it on lock or write conflicts."""
        def attempt():
            with self._connection() as con:
                con.execute("BEGIN TRANSACTION")
                try:
                    out = fn(con)
                    con.execute("COMMIT")
                    return out
                except BaseException:
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise

        return self._retry(attempt, "complete a transaction")

    def _read(self, fn):
        return self._transaction(fn)

    # -- schema ---------------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        def q(con):
            has_meta = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]
            if not has_meta:
                return 0
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            return int(row[0]) if row else 0

        return self._read(q)

    def _migrate(self) -> None:
        def up(con):
            has_meta = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise WorkbenchError(f"The store {self.path} was written by a newer version (schema {current}); "
                                     f"this one reads up to {SCHEMA_VERSION}.", hint="Update the workbench.")
            for step in MIGRATIONS[current:]:
                for sql in step:
                    con.execute(sql)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

        self._transaction(up)

    # -- runs and results -----------------------------------------------------------------------------------
    def put(self, run: RunRecord, result: Result) -> None:
        """Store a run and all its tables in one transaction (an interrupted put leaves nothing)."""
        blobs = [(name, len(df), to_parquet(df)) for name, df in result.tables().items()]
        meta = json.dumps(result.meta, default=str)
        created = run.created or datetime.now(timezone.utc).replace(tzinfo=None)

        timing = _timing_row(run, result)

        def write(con):
            if timing is not None:
                con.execute(f"INSERT INTO run_timings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {_NOW})", timing)
            con.execute("DELETE FROM results WHERE key = ?", [run.key])
            con.execute("DELETE FROM runs WHERE key = ?", [run.key])
            con.execute(
                "INSERT INTO runs (key, analysis, spec, model, fingerprint, version, created, duration_s, status, "
                "metadata, author, worker) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run.key, run.analysis, json.dumps(run.spec, sort_keys=True), run.model, run.fingerprint,
                 run.version, created, run.duration_s, run.status, meta, run.author, run.worker])
            con.executemany("INSERT INTO results (key, name, n_rows, parquet) VALUES (?, ?, ?, ?)",
                            [[run.key, n, rows, blob] for n, rows, blob in blobs])

        self._transaction(write)

    def get(self, key: str) -> Result | None:
        def read(con):
            row = con.execute("SELECT metadata FROM runs WHERE key = ? AND status = 'done'", [key]).fetchone()
            if row is None:
                return None
            parts = con.execute("SELECT name, parquet FROM results WHERE key = ?", [key]).fetchall()
            return row[0], parts

        found = self._read(read)
        if found is None:
            return None
        meta, parts = found
        tables = {name: from_parquet(blob) for name, blob in parts}
        return Result(table=tables.pop("main"), meta=json.loads(meta or "{}"), extra=tables)

    def run(self, key: str) -> RunRecord | None:
        def read(con):
            return con.execute("SELECT key, analysis, spec, model, fingerprint, version, author, created, "
                               "duration_s, status, worker FROM runs WHERE key = ?", [key]).fetchone()

        row = self._read(read)
        if row is None:
            return None
        return RunRecord(key=row[0], analysis=row[1], spec=json.loads(row[2]), model=row[3], fingerprint=row[4],
                         version=row[5], author=row[6] or "", created=row[7], duration_s=row[8], status=row[9],
                         worker=row[10] or "")

    def runs(self, analysis: str | None = None) -> pd.DataFrame:
        sql = ("SELECT key, analysis, model, fingerprint, version, author, created, duration_s, status, worker, "
               "spec FROM runs")
        args: list = []
        if analysis:
            sql += " WHERE analysis = ?"
            args.append(analysis)
        sql += " ORDER BY created DESC"
        return self._read(lambda con: con.execute(sql, args).df())

    def stored_keys(self, keys: list[str]) -> set[str]:
        """Which of these run keys the store holds (one query)."""
        if not keys:
            return set()
        return {r[0] for r in self._read(lambda con: con.execute(
            "SELECT key FROM runs WHERE status = 'done' AND key IN (SELECT unnest(?::VARCHAR[]))",
            [list(keys)]).fetchall())}

    # -- this machine's pace (time estimates: analysis/estimate.py) -----------------------------------------------
    def record_speed_probe(self, machine: str, dtype: str, width: int, flops_per_s: float, op_s: float,
                           bytes_per_s: float) -> None:
        self._transaction(lambda con: con.execute(
            f"INSERT INTO speed_probes VALUES (?, ?, ?, ?, ?, ?, {_NOW})",
            [machine, dtype, int(width), float(flops_per_s), float(op_s), float(bytes_per_s)]))

    def speed_probes(self, machine: str, dtype: str, width: int, limit: int = 9) -> list[tuple[float, float, float]]:
        """(FLOP/s, seconds per small operation, bytes/s) of this machine's last `limit` probes at this width,
        newest first."""
        return [tuple(r) for r in self._read(lambda con: con.execute(
            "SELECT flops_per_s, op_s, bytes_per_s FROM speed_probes WHERE machine = ? AND dtype = ? AND width = ? "
            "ORDER BY created DESC LIMIT ?", [machine, dtype, int(width), int(limit)]).fetchall())]

    def run_timings(self, machine: str, per_analysis: int = 20) -> list[dict]:
        """This machine's finished runs (the last `per_analysis` of each analysis), newest first: analysis, model
        (fingerprint), predicted_s (at the machine's speed, before any correction), measured_s, and extra_s (the
        part of predicted_s that is fixed seconds, not the machine's pace)."""
        rows = self._read(lambda con: con.execute(
            "SELECT analysis, model, predicted_s, measured_s, extra_s FROM (SELECT *, row_number() OVER (PARTITION "
            "BY analysis ORDER BY created DESC) AS n FROM run_timings WHERE machine = ?) WHERE n <= ? "
            "ORDER BY created DESC", [machine, int(per_analysis)]).fetchall())
        return [{"analysis": a, "model": m, "predicted_s": p, "measured_s": t, "extra_s": x}
                for a, m, p, t, x in rows]

    # -- batches (progress for the Runs page; a batch's results are ordinary runs) ----------------------------
    def start_batch(self, batch_id: str, *, total: int, hits: int, failed: int, executor: str) -> None:
        self._transaction(lambda con: con.execute(
            f"INSERT OR REPLACE INTO batches VALUES (?, ?, 'running', ?, 0, ?, ?, {_NOW}, {_NOW})",
            [batch_id, executor, total, hits, failed]))

    def update_batch(self, batch_id: str, *, status: str | None = None, done: int | None = None,
                     hits: int | None = None, failed: int | None = None) -> None:
        sets = {k: v for k, v in {"status": status, "done": done, "hits": hits, "failed": failed}.items()
                if v is not None}
        assign = ", ".join(f"{k} = ?" for k in sets)
        self._transaction(lambda con: con.execute(
            f"UPDATE batches SET {assign}, updated = {_NOW} WHERE id = ?", [*sets.values(), batch_id]))

    def batches(self, status: str | None = None) -> pd.DataFrame:
        sql, args = "SELECT * FROM batches", []
        if status:
            sql, args = sql + " WHERE status = ?", [status]
        return self._read(lambda con: con.execute(sql + " ORDER BY created DESC", args).df())

    def count(self, table: str = "runs") -> int:
        if table not in TABLES:
            raise ValueError(table)
        return self._read(lambda con: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    # -- counters -------------------------------------------------------------------------------------------
    def count_hit(self) -> None:
        with self._counter_lock:
            self.hits += 1

    def count_miss(self) -> None:
        with self._counter_lock:
            self.misses += 1

    # -- models ---------------------------------------------------------------------------------------------
    def remember_model(self, model: str, revision: str, dtype: str, fingerprint: str, summary: dict) -> None:
        """Record which weights a (model, revision, dtype) had, for lookups that must not load the model."""
        ident = (model, revision or "", dtype, fingerprint)
        if ident in self._remembered:
            return
        known = self.model_record(model, revision, dtype)
        if known is None or known["fingerprint"] != fingerprint or known["summary"] != json.loads(
                json.dumps(summary, default=str)):  # a record from before a summary field was kept is updated
            self._transaction(lambda con: con.execute(
                f"INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, {_NOW})",
                [model, revision or "", dtype, fingerprint, json.dumps(summary, default=str)]))
        self._remembered.add(ident)

    def model_record(self, model: str, revision: str, dtype: str) -> dict | None:
        row = self._read(lambda con: con.execute(
            "SELECT fingerprint, summary FROM models WHERE model = ? AND revision = ? AND dtype = ?",
            [model, revision or "", dtype]).fetchone())
        return None if row is None else {"fingerprint": row[0], "summary": json.loads(row[1])}

    def find_prompt_run(self, spec, version: str, fingerprint: str) -> list[int] | None:
        """Token ids of the newest stored run of this spec's prompt (same options), or None."""
        rows = self._read(lambda con: con.execute(
            "SELECT spec FROM runs WHERE analysis = ? AND fingerprint = ? AND version = ? AND status = 'done' "
            "ORDER BY created DESC", [spec.analysis, fingerprint, version]).fetchall())
        def options(d: dict) -> dict:  # fields added later count as their legacy value when absent
            return {k: v for k, v in d.items() if k != "token_ids" and spec.key_legacy.get(k, object()) != v}

        want = options(spec.to_dict())
        for (text,) in rows:
            stored = json.loads(text)
            ids = stored.get("token_ids")
            if ids and options(stored) == want:
                return ids
        return None

    # -- findings -------------------------------------------------------------------------------------------
    def add_finding(self, title: str, notes: str = "", author: str = "", runs: list[str] | None = None,
                    links: list[str] | None = None) -> str:
        title = (title or "").strip()
        if not title:
            raise WorkbenchError("A finding needs a title.")
        if len(title) > 500 or len(notes or "") > 50_000:
            raise WorkbenchError("A finding's title is limited to 500 characters and its notes to 50,000.")
        fid = uuid.uuid4().hex[:12]
        self._transaction(lambda con: con.execute(
            f"INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, {_NOW})",
            [fid, title, notes or "", author or "", json.dumps(list(runs or [])), json.dumps(list(links or []))]))
        return fid

    # -- datasets ---------------------------------------------------------------------------------------------
    def put_dataset(self, df: pd.DataFrame, *, name: str, kind: str, author: str = "") -> str:
        """Keep a user's dataset (already validated); its id is a hash of its content, so the same data gets the
        same id on every machine and a second upload changes nothing."""
        ds_id = store_import.dataset_id(kind, df)
        blob = to_parquet(df)

        def write(con):
            con.execute("INSERT OR IGNORE INTO datasets (id, name, kind, n_rows, columns, parquet, author, created) "
                        f"VALUES (?, ?, ?, ?, ?, ?, ?, {_NOW})",
                        [ds_id, name, kind, len(df), json.dumps(list(df.columns)), blob, author])

        self._transaction(write)
        return ds_id

    def get_dataset(self, ds_id: str) -> pd.DataFrame | None:
        row = self._read(lambda con: con.execute("SELECT parquet FROM datasets WHERE id = ?", [ds_id]).fetchone())
        return None if row is None else from_parquet(row[0])

    def datasets(self, kind: str | None = None) -> pd.DataFrame:
        sql = "SELECT id, name, kind, n_rows, columns, author, created FROM datasets"
        args = []
        if kind:
            sql += " WHERE kind = ?"
            args = [kind]
        return self._read(lambda con: con.execute(sql + " ORDER BY created DESC", args).df())

    def findings(self) -> pd.DataFrame:
        df = self._read(lambda con: con.execute(
            "SELECT id, title, notes, author, runs, links, created FROM findings ORDER BY created DESC").df())
        df["runs"] = df["runs"].map(json.loads)
        df["links"] = df["links"].map(json.loads)
        return df

    # -- bringing results in from elsewhere (store_import validates every row; see there) --------------------
    def import_store(self, other: str | Path, *, check_run) -> dict:
        """Copy the valid runs, results, findings, model records and datasets of another store file into this one
        (rows already here are kept). `check_run(row)` raises when a run row is not what its key says (the runner
        passes one that recomputes the key)."""
        good, skipped, why = store_import.read_store_file(Path(other), check_run, lambda copy: Store(copy))
        return store_import.summary(self._transaction(lambda con: store_import.insert(con, good)), skipped, why)

    def export_parquet(self, folder: str | Path) -> list[Path]:
        """Write every table as one Parquet file in `folder` (results keep their Parquet bytes in a column)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for table in TABLES:
            path = folder / f"{table}.parquet"
            self._read(lambda con, t=table, p=path: con.execute(f"COPY {t} TO '{_sql_str(p)}' (FORMAT parquet)"))
            out.append(path)
        return out

    def import_parquet(self, folder: str | Path, *, check_run) -> dict:
        """Bring in a folder written by export_parquet (e.g. by a batch job on another machine), validated as
        import_store does."""
        good, skipped, why = store_import.read_parquet_folder(Path(folder), check_run)
        return store_import.summary(self._transaction(lambda con: store_import.insert(con, good)), skipped, why)
