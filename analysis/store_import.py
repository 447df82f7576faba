"""Bringing another store's rows in (`import-store FILE`, `import-parquet FOLDER`): only validated rows of the
known tables, never views, within limits.

A store file or an exported folder may come from anyone, so nothing in it is pasted into SQL and nothing in it
is trusted: the file is read through a connection that cannot reach other files (`enable_external_access`
off), only base tables named like ours are read and only our columns of them, every row is checked (types,
sizes, JSON, Parquet that parses and has the rows it claims, a dataset id that is the hash of its content, a
run key that is the hash of its fingerprint, spec and version), and the rows that pass are written with
parameters in one transaction. A file that is not a store (a view where a table should be, a missing or extra
column, more rows than WORKBENCH_IMPORT_MAX_ROWS) is refused whole; single rows that fail a check are skipped and
counted, with the first reasons, in the answer.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import duckdb
import pandas as pd

from .errors import WorkbenchError
from .result import from_parquet

# every column we read, in table order (the schema of store.MIGRATIONS at SCHEMA_VERSION)
COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": ("key", "analysis", "spec", "model", "fingerprint", "version", "created", "duration_s", "status",
             "metadata", "author", "worker"),
    "results": ("key", "name", "n_rows", "parquet"),
    "findings": ("id", "title", "notes", "author", "runs", "links", "created"),
    "models": ("model", "revision", "dtype", "fingerprint", "summary", "updated"),
    "datasets": ("id", "name", "kind", "n_rows", "columns", "parquet", "author", "created"),
}
TABLES = tuple(COLUMNS)
MAX_TEXT = 1 << 20  # 1 MiB for a spec, metadata or a summary
MAX_BLOB = 1 << 30  # one result table's Parquet bytes
CHUNK = 256  # rows read at a time (result blobs can be large)

CheckRun = Callable[[dict], None]  # raises ValueError / WorkbenchError when a run row is not what it claims


def max_rows() -> int:
    return int(os.environ.get("WORKBENCH_IMPORT_MAX_ROWS", "200000"))


class _Rejected(ValueError):
    """One row failed a check (it is skipped and counted)."""


# -- per-field checks ---------------------------------------------------------------------------------------
def _text(row: dict, col: str, *, max_len: int = 1024, empty: bool = True) -> str:
    v = row[col]
    if v is None and empty:
        v = row[col] = ""
    if not isinstance(v, str):
        raise _Rejected(f"{col} is not text")
    if len(v) > max_len or (not empty and not v.strip()):
        raise _Rejected(f"{col} is empty or longer than {max_len} characters")
    return v


def _json(row: dict, col: str, kind: type, *, nullable: bool = False) -> Any:
    v = row[col]
    if v is None and nullable:
        return None
    _text(row, col, max_len=MAX_TEXT, empty=False)
    try:
        parsed = json.loads(v)
    except ValueError:
        raise _Rejected(f"{col} is not JSON") from None
    if not isinstance(parsed, kind):
        raise _Rejected(f"{col} is not a JSON {kind.__name__}")
    if kind is list and not all(isinstance(x, str) and len(x) <= 4096 for x in parsed):
        raise _Rejected(f"{col} is not a list of short texts")
    return parsed


def _time(row: dict, col: str) -> None:
    v = row[col]
    if isinstance(v, pd.Timestamp):
        v = row[col] = v.to_pydatetime()
    if not isinstance(v, datetime):
        raise _Rejected(f"{col} is not a timestamp")
    if v.tzinfo is not None:
        row[col] = v.replace(tzinfo=None)


def _count(row: dict, col: str) -> int:
    v = row[col]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Rejected(f"{col} is not a row count")
    return v


def _parquet(row: dict, col: str) -> pd.DataFrame:
    v = row[col]
    if isinstance(v, (bytearray, memoryview)):
        v = row[col] = bytes(v)
    if not isinstance(v, bytes) or len(v) > MAX_BLOB or v[:4] != b"PAR1":
        raise _Rejected(f"{col} is not Parquet")
    try:
        df = from_parquet(v)
    except Exception:  # noqa: BLE001 - whatever pyarrow says, the bytes are not a table we can read
        raise _Rejected(f"{col} does not parse as Parquet") from None
    if len(df) != _count(row, "n_rows"):
        raise _Rejected(f"{col} holds {len(df)} rows, not the {row['n_rows']} the row claims")
    return df


_HEX = re.compile(r"^[0-9a-f]{1,64}$")


def dataset_id(kind: str, df: pd.DataFrame) -> str:
    """A dataset's id: the hash of its kind and content (Store.put_dataset gives it; an import checks it)."""
    canonical = df.to_json(orient="split", index=False)
    return hashlib.sha256(f"{kind}\n{canonical}".encode()).hexdigest()[:16]


def _check(table: str, row: dict, check_run: CheckRun) -> None:
    if table == "runs":
        _text(row, "key", max_len=128, empty=False)
        if not re.match(r"^[A-Za-z_][\w.]{0,63}$", _text(row, "analysis", max_len=64, empty=False)):
            raise _Rejected("analysis is not a name")
        _json(row, "spec", dict)
        for col, n in (("model", 1024), ("fingerprint", 128), ("version", 64), ("author", 200), ("worker", 200)):
            _text(row, col, max_len=n)
        _time(row, "created")
        d = row["duration_s"]
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0):
            raise _Rejected("duration_s is not a duration")
        if row["status"] != "done":
            raise _Rejected("status is not 'done'")
        _json(row, "metadata", dict, nullable=True)
        try:
            check_run(row)
        except (ValueError, TypeError, KeyError, WorkbenchError) as e:
            raise _Rejected(f"run {row['key'][:32]}: {e}") from None
    elif table == "results":
        _text(row, "key", max_len=128, empty=False)
        _text(row, "name", max_len=128, empty=False)
        _parquet(row, "parquet")
    elif table == "findings":
        if not _HEX.match(_text(row, "id", max_len=64, empty=False)):
            raise _Rejected("id is not a finding id")
        _text(row, "title", max_len=500, empty=False)
        _text(row, "notes", max_len=50_000)
        _text(row, "author", max_len=200)
        _json(row, "runs", list)
        _json(row, "links", list)
        _time(row, "created")
    elif table == "models":
        for col, n in (("model", 1024), ("revision", 128), ("dtype", 32), ("fingerprint", 128)):
            _text(row, col, max_len=n, empty=col == "revision")
        _json(row, "summary", dict)
        _time(row, "updated")
    elif table == "datasets":
        for col, n in (("name", 500), ("kind", 64), ("author", 200)):
            _text(row, col, max_len=n, empty=col == "author")
        df = _parquet(row, "parquet")
        if _json(row, "columns", list) != [str(c) for c in df.columns]:
            raise _Rejected("columns do not match the data")
        if row["id"] != dataset_id(row["kind"], df):
            raise _Rejected("id is not the hash of the dataset's content")
        _time(row, "created")


# -- sources ------------------------------------------------------------------------------------------------
class _Source:
    """Rows of the five tables, read a chunk at a time, from a store file or an exported Parquet folder."""

    def count(self, table: str) -> int: ...

    def rows(self, table: str, cols: tuple[str, ...]) -> Iterator[list[dict]]: ...


class _FileSource(_Source):
    def __init__(self, con: duckdb.DuckDBPyConnection, label: str, *, complete: bool = True):
        """complete=False: only check that nothing named like our tables is a view (before migrating an older
        store, which may lack later tables and columns)."""
        self.con = con
        kinds = {name: kind for name, kind in con.execute(
            "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        for t in TABLES:
            if not complete and t not in kinds:
                continue
            if kinds.get(t) != "BASE TABLE":
                what = "has no table" if t not in kinds else f"has a {kinds[t].lower()} where the table should be"
                raise WorkbenchError(f"{label} is not a workbench store: it {what} '{t}'.",
                                     hint="An import reads the tables of a store this workbench wrote, nothing else.")
            have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                              "WHERE table_schema = 'main' AND table_name = ?", [t]).fetchall()}
            missing = [c for c in COLUMNS[t] if c not in have]
            if missing and complete:
                raise WorkbenchError(f"{label} is not a workbench store: its table '{t}' lacks {', '.join(missing)}.")

    def count(self, table):
        return self.con.execute(f'SELECT count(*) FROM main."{table}"').fetchone()[0]

    def rows(self, table, cols):
        quoted = ", ".join(f'"{c}"' for c in cols)  # our column names, quoted
        cur = self.con.execute(f'SELECT {quoted} FROM main."{table}"')
        while chunk := cur.fetchmany(CHUNK):
            yield [dict(zip(cols, r)) for r in chunk]


class _ParquetSource(_Source):
    def __init__(self, folder: Path):
        import pyarrow.parquet as pq

        self.files = {}
        for t in TABLES:
            path = folder / f"{t}.parquet"
            try:
                f = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - not a Parquet file: say which
                raise WorkbenchError(f"{path.name} in that folder is not a Parquet file "
                                     f"({type(e).__name__}).") from None
            names = f.schema_arrow.names
            unknown = [n for n in names if n not in COLUMNS[t]]
            missing = [c for c in COLUMNS[t] if c not in names]
            if unknown or missing:
                problems = [f"unexpected columns {', '.join(map(repr, unknown[:5]))}"] if unknown else []
                problems += [f"missing {', '.join(missing)}"] if missing else []
                raise WorkbenchError(f"{path.name} is not an exported '{t}' table: {'; '.join(problems)}.",
                                     hint="Import a folder written by `python -m analysis export-parquet`.")
            self.files[t] = f

    def count(self, table):
        return self.files[table].metadata.num_rows

    def rows(self, table, cols):
        for batch in self.files[table].iter_batches(batch_size=CHUNK, columns=list(cols)):
            yield batch.to_pylist()


# -- the import -----------------------------------------------------------------------------------------------
def _validated(source: _Source, check_run: CheckRun):
    """{table: [rows that pass]}, and the skipped rows' reasons."""
    limit = max_rows()
    for t in TABLES:
        n = source.count(t)
        if n > limit:
            raise WorkbenchError(f"That store holds {n:,} rows in '{t}'; an import takes at most {limit:,} per table.",
                                 hint="Raise WORKBENCH_IMPORT_MAX_ROWS if you trust the file, or import a smaller "
                                      "export.")
    good: dict[str, list[dict]] = {t: [] for t in TABLES}
    skipped: Counter = Counter()
    reasons: list[str] = []

    def reject(t: str, why: str) -> None:
        skipped[t] += 1
        if len(reasons) < 5:
            reasons.append(f"{t}: {why}")

    for t in TABLES:
        for chunk in source.rows(t, COLUMNS[t]):
            for row in chunk:
                try:
                    _check(t, row, check_run)
                except _Rejected as e:
                    reject(t, str(e))
                    continue
                good[t].append(row)
    # a run needs its main table, and a result table needs its run in the same file
    with_main = {r["key"] for r in good["results"] if r["name"] == "main"}
    runs = []
    for r in good["runs"]:
        (runs.append(r) if r["key"] in with_main else reject("runs", f"run {r['key'][:32]} has no main table"))
    good["runs"] = runs
    # tables come in with their run only (insert() leaves out those of runs the store already holds)
    ours = {r["key"] for r in runs}
    results = []
    for r in good["results"]:
        (results.append(r) if r["key"] in ours
         else reject("results", f"table {r['name'][:40]!r} belongs to no run in the file"))
    good["results"] = results
    return good, dict(skipped), reasons


def insert(con: duckdb.DuckDBPyConnection, good: dict[str, list[dict]]) -> dict[str, int]:
    """Write the validated rows (rows already here are kept, and a run already here gets no tables from the
    import: checked again inside this transaction); {table: rows added}."""
    keys = sorted({r["key"] for r in good["runs"]})
    present = {r[0] for r in con.execute("SELECT key FROM runs WHERE key IN (SELECT unnest(?::VARCHAR[]))",
                                         [keys]).fetchall()} if keys else set()
    good = {**good, "results": [r for r in good["results"] if r["key"] not in present]}
    added = {}
    for t in TABLES:
        before = con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        cols = COLUMNS[t]
        rows = [[r[c] for c in cols] for r in good[t]]
        if rows:
            con.executemany(f"INSERT OR IGNORE INTO {t} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                            rows)
        added[t] = con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] - before
    return added


def read_store_file(other: Path, check_run: CheckRun, migrate: Callable[[Path], None]):
    """Validated rows of another store file (migrated on a temporary copy; the file itself is never modified)."""
    if not other.is_file():
        raise WorkbenchError(f"There is no store file at {other}.")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "import.duckdb"
        shutil.copy(other, copy)
        wal = other.with_name(other.name + ".wal")
        if wal.exists():
            shutil.copy(wal, copy.with_name(copy.name + ".wal"))
        try:
            with duckdb.connect(str(copy), read_only=True, config={"enable_external_access": False}) as con:
                _FileSource(con, other.name, complete=False)  # a view where a table should be: refused first
            migrate(copy)  # to this schema (our SQL only, on the copy)
            with duckdb.connect(str(copy), read_only=True, config={"enable_external_access": False}) as con:
                return _validated(_FileSource(con, other.name), check_run)
        except duckdb.Error as e:
            raise WorkbenchError(f"{other.name} is not a workbench store this version can read "
                                 f"({type(e).__name__}).") from None


def read_parquet_folder(folder: Path, check_run: CheckRun):
    missing = [t for t in TABLES if not (folder / f"{t}.parquet").is_file()]
    if missing:
        raise WorkbenchError(f"{folder} is not an exported store: {', '.join(m + '.parquet' for m in missing)} "
                             "missing.", hint="Export one with `python -m analysis export-parquet FOLDER`.")
    return _validated(_ParquetSource(folder), check_run)


def summary(added: dict[str, int], skipped: dict[str, int], reasons: Iterable[str]) -> dict:
    out: dict[str, Any] = dict(added)
    if skipped:
        out["skipped"] = skipped
        out["why"] = list(reasons)
    return out
