"""What a run produces and how it is recorded: the core types every analysis, the runner and the store share.

No DuckDB here: an analysis (or a remote worker) builds a `Result` without the store; the store imports these.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

Progress = Callable[[float, str], None]  # fraction done in [0, 1], what is happening


def no_progress(frac: float, what: str) -> None:
    """A progress callback that reports nothing."""


def sub_progress(progress: Progress, lo: float, hi: float, prefix: str = "") -> Progress:
    """The progress callback of one part of a run, the span [lo, hi] of it: a fraction f of the part is reported
    as lo + (hi - lo) * f, with `prefix` before what it says (a loop inside a part reports through it)."""

    def report(frac: float, what: str) -> None:
        progress(lo + (hi - lo) * min(max(float(frac), 0.0), 1.0), f"{prefix}{what}" if prefix else what)

    return report


@dataclass
class Result:
    """A tidy result: the main long-format table, optional named side tables, and a small metadata dict."""

    table: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"main": self.table, **self.extra}


@dataclass(frozen=True)
class RunRecord:
    key: str
    analysis: str
    spec: dict
    model: str
    fingerprint: str
    version: str
    author: str = ""
    created: datetime | None = None
    duration_s: float | None = None
    status: str = "done"
    worker: str = ""  # where it was computed: host and pid, or the Ray node


def to_parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def from_parquet(blob: bytes) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(blob)).to_pandas()


def encode_result(result: Result) -> dict:
    """A Result as Parquet bytes per table and its metadata as JSON (what a batch worker sends the driver;
    never pickle)."""
    return {"tables": {name: to_parquet(df) for name, df in result.tables().items()},
            "meta": json.dumps(result.meta, default=str)}


def decode_result(data: dict) -> Result:
    tables = {name: from_parquet(blob) for name, blob in data["tables"].items()}
    return Result(table=tables.pop("main"), meta=json.loads(data["meta"]), extra=tables)
