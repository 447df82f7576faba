"""Text a person typed (or a file someone sent) shown without acting on it, in every output we write.

- CSV: a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is a formula to a spreadsheet
  program; such cells (and column names) get a leading `'` (the OWASP rule), so they open as text.
- Markdown (Streamlit's text elements): every character Markdown acts on is backslash-escaped, so an image
  (`![x](http://host/pixel.png)`), a link, an autolink, an HTML tag or a Streamlit directive shows as the
  characters typed and nothing is fetched.
- Links: live only when they lead into the app itself (a `?query` or the app's own address); anything else,
  `javascript:` and other sites included, is shown as plain text.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# what Markdown (CommonMark, GFM, Streamlit's directives and $math$) acts on; quotes, commas and the like stay
# readable
_MD_SPECIAL = re.compile("([" + re.escape("\\`*_{}[]()#+-.!|<>~:&$@=^/") + "])")


def csv_cell(value):
    """A value as a spreadsheet should see it: text that would start a formula gets a leading quote."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every text cell and column name neutralised by csv_cell (numbers are left as numbers)."""
    out = df.rename(columns=lambda c: csv_cell(c) if isinstance(c, str) else c)
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(csv_cell)
    return out


_AUTOLINKS = re.compile(r"(?i)(:)(//)|(www)(\.)|(\S)(@)")
_ZWSP = "\u200b"  # a zero-width space: invisible, but no autolink spans it


def md_escape(text: str) -> str:
    """Text that Markdown shows literally: every character it would act on escaped, and a zero-width space put
    into "://", "www." and "x@" (Streamlit's GFM turns those into live links even when escaped)."""
    text = _AUTOLINKS.sub(lambda m: _ZWSP.join(g for g in m.groups() if g is not None), str(text))
    return _MD_SPECIAL.sub(r"\\\1", text)


def app_link(link: str, app_url: str = "") -> bool:
    """Does this link lead into the app: a bare `?query`, or the app's own scheme, host and path?"""
    if not isinstance(link, str) or any(c in link for c in "\\\n\r\t "):
        return False
    if link.startswith("?"):
        return True
    if not app_url:
        return False
    got, app = urlsplit(link), urlsplit(app_url)
    return (got.scheme in ("http", "https") and (got.scheme, got.netloc) == (app.scheme, app.netloc)
            and got.path.rstrip("/").startswith(app.path.rstrip("/")))
