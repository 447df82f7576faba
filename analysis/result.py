"""What a run produces and how it is recorded: the core types every analysis, the runner and the store share.

No DuckDB here: an analysis (or a remote worker) builds a `Result` without the store; the store imports these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import pandas as pd

Progress = Callable[[float, str], None]  # fraction done in [0, 1], what is happening


def no_progress(frac: float, what: str) -> None:
    """A progress callback that reports nothing."""


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
