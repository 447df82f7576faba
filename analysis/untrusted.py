"""Text a person typed (or a file someone sent) shown without acting on it, in every output we write.

- CSV: a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is a formula to a spreadsheet
  program; such cells (and column names) get a leading `'` (the OWASP rule), so they open as text.
- Markdown (Streamlit's text elements): every character Markdown acts on is backslash-escaped, so an image
  (`![x](http://host/pixel.png)`), a link, an autolink, an HTML tag or a Streamlit directive shows as the
  characters typed and nothing is fetched.
- Links: live only when they lead into the app itself (a `?query`, or the app's own scheme, host and port with a
  path under its base path); anything else, `javascript:`, other sites and ports, look-alike hosts
  (`localhost:8611.evil.example`) and userinfo (`localhost:8611@evil.example`) included, is shown as plain text.
"""
from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

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


# an address's host and port: a DNS name or IPv4 address, or a bracketed IPv6 one, then digits (no userinfo)
_NETLOC = re.compile(r"(?P<host>[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(parts) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a split http(s) address, or None for anything else: userinfo (`ours@evil.example`),
    a port that is not a number (`localhost:8611.evil.example`), a host with characters no host name has."""
    scheme, m = parts.scheme.lower(), _NETLOC.fullmatch(parts.netloc.lower())
    if scheme not in _DEFAULT_PORTS or m is None:
        return None
    return scheme, m["host"], int(m["port"]) if m["port"] else _DEFAULT_PORTS[scheme]


def _segments(path: str) -> list[str] | None:
    """A path's segments, or None if any is `.` or `..` (also percent-encoded: a browser resolves them, which
    would take a link out of the app's base path)."""
    segs = [s for s in path.split("/") if s]
    if any(unquote(s).lower() in (".", "..") for s in segs):
        return None
    return segs


def app_link(link: str, app_url: str = "") -> bool:
    """Does this link lead into the app: a bare `?query` (this page), or an address at the app's own origin
    (scheme, host and port, no userinfo) whose path lies under the app's base path? `app_url` is the app's base
    address (views.common.app_url(page=False)); a page's address works too, for links to that page only."""
    if not isinstance(link, str) or not link or any(c in link for c in "\\ ") or any(
            ord(c) < 0x20 or ord(c) == 0x7F for c in link):
        return False
    if link.startswith("?"):
        return True
    if not app_url:
        return False
    got, app = urlsplit(link), urlsplit(app_url)
    if _origin(got) is None or _origin(got) != _origin(app):
        return False
    got_path, base_path = _segments(got.path), _segments(app.path)
    return got_path is not None and base_path is not None and got_path[:len(base_path)] == base_path
