"""Concept-labelled text: the shipped sentences, or a CSV a user brings.

A concept CSV has a text column (`text`) and one column per concept whose values are class labels (strings or
numbers, at least two classes each); any other column named `id` is ignored. It is validated before anything is
stored, and each problem gets its own message. A valid CSV is kept in the store's `datasets` table under a hash
of its content, so a spec (and a link) names it as `dataset=<id>` and replays it on any machine that shares the
store; `dataset=shipped` is the default model's 2,000 sentences.
"""
from __future__ import annotations

import io
import re
from typing import Callable

import pandas as pd

from .errors import WorkbenchError
from .tasks import task_rows

SHIPPED = "shipped"
SHIPPED_CONCEPTS = ("sentiment", "tense", "number", "topic")
KIND = "concepts"

MAX_BYTES = 5 * 1024 * 1024
MAX_ROWS = 20_000
MAX_TEXT_CHARS = 2_000
MAX_CONCEPTS = 16
MAX_CLASSES = 50
MIN_PER_CLASS = 10
MIN_ROWS = 20
_ID = re.compile(r"[0-9a-f]{16}")


def shipped() -> pd.DataFrame:
    rows = task_rows("concepts")
    return pd.DataFrame([{"text": r["text"], **{c: r[c] for c in SHIPPED_CONCEPTS}} for r in rows])


def parse_concepts_csv(data: bytes | str, *, name: str = "upload.csv") -> pd.DataFrame:
    """Validate a concept CSV and return it as a frame of `text` and the concept columns (labels as strings)."""
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_BYTES:
        raise WorkbenchError(f"{name} is {len(data) / 2**20:.1f} MiB; concept files can be at most "
                             f"{MAX_BYTES // 2**20} MiB.", hint=f"Keep at most {MAX_ROWS:,} rows of short text.")
    if not data.strip():
        raise WorkbenchError(f"{name} is empty.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{name} is not UTF-8 text (byte {e.start}).", hint="Save the CSV as UTF-8.") from e
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise WorkbenchError(f"{name} could not be read as CSV: {str(e).splitlines()[0][:200]}") from e
    df.columns = [str(c).strip() for c in df.columns]
    cols = {c.lower(): c for c in df.columns}
    if "text" not in cols:
        raise WorkbenchError(f"{name} has no 'text' column (columns: {', '.join(df.columns[:12]) or 'none'}).",
                             hint="Name the column holding the sentences 'text'; every other column is a concept.")
    if len(set(cols)) != len(df.columns):
        raise WorkbenchError(f"{name} has repeated column names.")
    df = df.rename(columns={cols["text"]: "text"})
    concepts = [c for c in df.columns if c != "text" and c.lower() != "id"]
    if not concepts:
        raise WorkbenchError(f"{name} has a text column but no concept column.",
                             hint="Add one column per concept (e.g. 'sentiment' with values positive/negative).")
    if len(concepts) > MAX_CONCEPTS:
        raise WorkbenchError(f"{name} has {len(concepts)} concept columns; at most {MAX_CONCEPTS}.")
    if len(df) > MAX_ROWS:
        raise WorkbenchError(f"{name} has {len(df):,} rows; at most {MAX_ROWS:,}.")
    if len(df) < MIN_ROWS:
        raise WorkbenchError(f"{name} has {len(df)} rows; probes need at least {MIN_ROWS}.")
    empty = df.index[df["text"].isna() | (df["text"].fillna("").str.strip() == "")]
    if len(empty):
        raise WorkbenchError(f"{name}: {len(empty)} row(s) have no text (first: row {int(empty[0]) + 2}).",
                             hint="Rows are numbered as in a spreadsheet, the header being row 1.")
    long = df.index[df["text"].str.len() > MAX_TEXT_CHARS]
    if len(long):
        raise WorkbenchError(f"{name}: {len(long)} text(s) are longer than {MAX_TEXT_CHARS:,} characters (first: "
                             f"row {int(long[0]) + 2}).")
    problems = []
    for c in concepts:
        missing = df.index[df[c].isna()]
        if len(missing):
            problems.append(f"'{c}' has no label in {len(missing)} row(s) (first: row {int(missing[0]) + 2})")
            continue
        df[c] = df[c].str.strip()
        counts = df[c].value_counts()
        if len(counts) < 2:
            problems.append(f"'{c}' has a single class ({counts.index[0]!r}); a concept needs at least two")
        elif len(counts) > MAX_CLASSES:
            problems.append(f"'{c}' has {len(counts)} classes; at most {MAX_CLASSES}")
        elif counts.min() < MIN_PER_CLASS:
            few = ", ".join(f"{k!r}: {v}" for k, v in counts[counts < MIN_PER_CLASS].items())
            problems.append(f"'{c}' has too few examples per class ({few}); each class needs at least "
                            f"{MIN_PER_CLASS}")
    if problems:
        raise WorkbenchError(f"{name}: " + "; ".join(problems) + ".")
    return df[["text", *concepts]].reset_index(drop=True)


def save_concepts_csv(store, data: bytes | str, *, name: str = "upload.csv", author: str = "") -> str:
    """Validate and keep a concept CSV; returns its dataset id (nothing is stored when it is invalid)."""
    df = parse_concepts_csv(data, name=name)
    return store.put_dataset(df, name=name, kind=KIND, author=author)


def load(dataset: str, get_stored: Callable[[str], pd.DataFrame | None] | None = None) -> pd.DataFrame:
    """The concept frame (`text` + concept columns) named by a spec's `dataset` field; `get_stored(id)` reads an
    upload (the runner passes the store's reader: an analysis never opens the store)."""
    if dataset == SHIPPED:
        return shipped()
    if not _ID.fullmatch(dataset):
        raise WorkbenchError(f"dataset must be 'shipped' or the 16-character id of an uploaded CSV, not "
                             f"{dataset[:40]!r}.")
    df = get_stored(dataset) if get_stored is not None else None
    if df is None:
        raise WorkbenchError(f"The concept dataset {dataset} is not in this store.",
                             hint="Upload the CSV on the Concepts page (or import the store it was uploaded to).")
    return df


def concept_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c != "text"]


def pick_concepts(requested, available: list[str]) -> list[str]:
    """The requested concepts (all available ones when none are), each checked to exist."""
    if not requested:
        return list(available)
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise WorkbenchError(f"No concept {', '.join(map(repr, unknown))} in this dataset.",
                             hint=f"Its concepts: {', '.join(available)}.")
    return list(requested)
