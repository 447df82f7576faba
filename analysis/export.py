"""Export: the tidy table as CSV, and self-contained HTML reports (plotly.js inlined, so they open offline).

Every piece of text a person typed (prompts, tokens, notes, titles, specs) is HTML-escaped; figure data goes in
through plotly's own JSON encoder, which escapes '<' and '/' inside strings. A link is live only when it leads
into the app the report came from (`app_url`); any other (another site, `javascript:`) is plain text, so
opening or clicking in a report fetches and runs nothing from elsewhere.
"""
from __future__ import annotations

import functools
import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd
import plotly.graph_objects as go

from .registry import REGISTRY
from .result import Result
from .store import Store
from .untrusted import app_link, csv_safe


def to_csv(df: pd.DataFrame) -> bytes:
    """Every CSV we write: text cells that a spreadsheet would run as formulas are neutralised (untrusted.py)."""
    return csv_safe(df).to_csv(index=False).encode()


@functools.lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


@dataclass
class ReportItem:
    """One analysis run in a report."""

    title: str
    analysis: str
    run_key: str
    spec: dict
    model_summary: dict
    figures: dict[str, go.Figure] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    notes: str = ""
    link: str = ""  # the view's link (a finding's first; its others are in `more_links`)
    meta: dict = field(default_factory=dict)
    more_links: list[str] = field(default_factory=list)


def item_from_result(title: str, analysis: str, key: str, spec: dict, result: Result, *, notes: str = "",
                     link: str = "", figures: dict[str, go.Figure] | None = None) -> ReportItem:
    if figures is None:
        entry = REGISTRY.get(analysis)
        figures = entry.figures(result) if entry is not None and entry.figures is not None else {}
    return ReportItem(title=title, analysis=analysis, run_key=key, spec=spec,
                      model_summary=result.meta.get("model_summary", {}), figures=figures, table=result.table,
                      notes=notes, link=link, meta={k: v for k, v in result.meta.items() if k != "model_summary"})


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2.5rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .5rem}
th{background:#f5f5f5;text-align:left}pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}
.notes{white-space:pre-wrap;background:#fffbe6;border-left:3px solid #e6c200;padding:.5rem .8rem}
.meta{color:#666;font-size:.85rem}
"""


def _kv_table(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_short(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _short(v, limit: int = 2000) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit] + " …"


def _df_table(df: pd.DataFrame, max_rows: int = 50) -> str:
    head = df.head(max_rows)
    cols = "".join(f"<th>{html.escape(str(c))}</th>" for c in head.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in head.itertuples(index=False))
    more = f"<p class='meta'>{len(df) - max_rows:,} more rows in the CSV.</p>" if len(df) > max_rows else ""
    return f"<table><tr>{cols}</tr>{body}</table>{more}"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return repr(v) if isinstance(v, str) and v != v.strip() else str(v)


def _link_html(link: str, app_url: str) -> str:
    if app_link(link, app_url):
        return f"<a href=\"{html.escape(link, quote=True)}\">{html.escape(link)}</a>"
    return f"<code>{html.escape(link)}</code>"


def _item_html(item: ReportItem, app_url: str = "") -> str:
    parts = [f"<h2>{html.escape(item.title)}</h2>",
             f"<p class='meta'>analysis <code>{html.escape(item.analysis)}</code> · run key "
             f"<code>{html.escape(item.run_key)}</code></p>"]
    for link in filter(None, [item.link, *item.more_links]):
        parts.append(f"<p class='meta'>Link: {_link_html(link, app_url)}</p>")
    if item.notes:
        parts.append(f"<div class='notes'>{html.escape(item.notes)}</div>")
    for name, fig in item.figures.items():
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=None,
                                 config={"displaylogo": False}))
    if item.table is not None:
        parts.append("<h3>Table</h3>" + _df_table(item.table))
    parts.append("<h3>Spec</h3>" + _kv_table(item.spec))
    if item.model_summary:
        parts.append("<h3>Model</h3>" + _kv_table(item.model_summary))
    if item.meta:
        parts.append("<h3>Metadata</h3>" + _kv_table(item.meta))
    return "\n".join(parts)


def html_report(title: str, items: list[ReportItem], *, intro: str = "", app_url: str = "") -> str:
    """A single self-contained HTML file: no network needed to open it (links into `app_url`, the app's base
    address or a page's, stay live; untrusted.app_link)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(_item_html(i, app_url) for i in items)
    intro_html = f"<div class='notes'>{html.escape(intro)}</div>" if intro else ""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script type='text/javascript'>{_plotly_js()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='meta'>Interpretability workbench report · {when}</p>"
            f"{intro_html}{body}</body></html>")


def findings_report(store: Store, app_url: str = "") -> tuple[str, bytes]:
    """All findings as one HTML report (with the figures of every linked stored run) and one CSV. `app_url` is the
    app's base address: a link into it is live in the HTML and is the CSV's `view` (the finding's first such link,
    alone in its cell, so a spreadsheet can follow it); other links are text in both."""
    df = store.findings()
    items: list[ReportItem] = []
    for f in df.itertuples(index=False):
        runs = [store.run(k) for k in f.runs]
        links = list(f.links)
        items.append(ReportItem(title=f.title, analysis="finding", run_key=", ".join(f.runs) or "-",
                                spec={"author": f.author, "created": str(f.created)},
                                model_summary={}, notes=f.notes, link=links[0] if links else "",
                                more_links=links[1:]))
        for rec in runs:
            res = store.get(rec.key) if rec else None
            if rec is not None and res is not None:
                items.append(item_from_result(f"{f.title}: {rec.analysis} run", rec.analysis, rec.key, rec.spec,
                                              res))
    view = df["links"].map(lambda r: next((k for k in r if app_link(k, app_url) and not k.startswith("?")), ""))
    csv_df = df.assign(runs=df["runs"].map(lambda r: " ".join(r)), links=df["links"].map(lambda r: " ".join(r)),
                       view=view)
    return html_report("Findings", items, app_url=app_url), to_csv(csv_df)
