"""Links into the app (issue 26, item 3): a finding saved from /lens called its own link foreign on /findings (the
address links were judged against held the page's path, /findings), so there was no "Open the view" button and
findings.html held no live link. Both directions are tested: the app's own links are live on the Findings page, in
review mode and in every export; hostile ones (tests/test_trust.py, tests/test_app.py) stay dead."""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from streamlit.testing.v1 import AppTest
from test_app import APP, _qp, _switch

from analysis.store import Store
from analysis.untrusted import app_link

APP_BASE = "http://localhost:8611"
HOSTILE = [
    "javascript:alert(1)",
    "http://elsewhere.example/lens?model=default",  # another host
    "http://localhost:8612/lens?model=default",  # another port
    "https://localhost:8611/lens?model=default",  # another scheme
    "http://localhost:8611.evil.example/lens?model=default",  # a look-alike host
    "http://localhost:8611@evil.example/lens?model=default",  # userinfo: the host is evil.example
    "http://ours@localhost:8611/lens?model=default",  # userinfo at all
    "http://localhost:8611:80/lens",
    "//localhost:8611/lens",
    "http://localhost:8611/lens\n",
    "http://localhost:8611/le ns",
]


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "app.duckdb"))
    from analysis.runner import get_store

    get_store.cache_clear()
    yield Path(tmp_path / "app.duckdb")
    get_store.cache_clear()


@pytest.fixture()
def downloads(monkeypatch) -> dict[str, bytes]:
    """What each download button of an AppTest run offers, by the file id in its url (AppTest keeps the files in
    a mock runtime it drops after the run)."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files: dict[str, bytes] = {}
    load = MemoryMediaFileStorage.load_and_get_id

    def keep(self, path_or_data, *args, **kwargs):
        file_id = load(self, path_or_data, *args, **kwargs)
        files[file_id] = path_or_data if isinstance(path_or_data, bytes) else Path(path_or_data).read_bytes()
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    return files


def _download(at: AppTest, files: dict[str, bytes], label: str) -> bytes:
    button = next(b for b in at.get("download_button") if b.proto.label == label)
    return files[Path(button.proto.url).stem]


def _live_hrefs(doc: str) -> list[str]:
    """Where the document's links go (an HTML parser's reading: the inlined plotly.js is script text, not links)."""
    from html.parser import HTMLParser

    hrefs: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            hrefs.extend(v for k, v in attrs if tag == "a" and k == "href")

    Links().feed(doc)
    return hrefs


def _csv_rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode())))


# -- the judge ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [APP_BASE, APP_BASE + "/", "http://LOCALHOST:8611"])
def test_the_apps_own_links_are_its_own(base):
    for link in (f"{APP_BASE}/lens?model=default&token_ids=0,282", f"{APP_BASE}/findings", APP_BASE,
                 f"{APP_BASE}/", f"{APP_BASE}/?prompt=x", "http://localhost:8611/patching#top", "?model=default"):
        assert app_link(link, base), link
    for link in HOSTILE:
        assert not app_link(link, base), link


def test_a_base_path_bounds_the_app():
    """Served under `server.baseUrlPath` (or a proxy's prefix), the app is that path and what lies under it."""
    base = f"{APP_BASE}/wb"
    assert app_link(f"{base}/lens?model=default", base) and app_link(base, base) and app_link(f"{base}/", base)
    for link in (f"{APP_BASE}/lens?model=default", f"{APP_BASE}/wbx/lens", f"{APP_BASE}/", f"{base}/../lens",
                 f"{base}/%2e%2e/lens", f"{base}/./../x", *[h.replace("/lens", "/wb/lens") for h in HOSTILE]):
        assert not app_link(link, base), link


# -- the Findings page, its exports and a single result's report -------------------------------------------------
def test_a_finding_saved_from_lens_opens_its_view_from_findings_and_every_export(own_store, downloads):
    at = AppTest.from_file(APP, default_timeout=120)
    at.context["url"] = f"{APP_BASE}/lens"  # the browser's address (AppTest has none)
    at.run()
    at.query_params.clear()
    _switch(at, "lens").run()
    assert not at.exception and not at.error
    link = next(c.value for c in at.code if c.value.startswith(f"{APP_BASE}/lens?"))  # the page's share link
    assert dict(parse_qsl(urlsplit(link).query)) == {k: _qp(at, k) for k in at.query_params}
    # the single result's HTML report: its link into the app is live, and it is the only live link
    report = _download(at, downloads, "Download HTML report").decode()
    assert _live_hrefs(report) == [link]

    next(t for t in at.text_input if t.label == "Title").input("The lens reads Mary")
    next(b for b in at.button if b.label == "Save finding").click().run()
    assert any("Saved finding" in s.value for s in at.success)
    Store(own_store).add_finding("Hostile links", links=HOSTILE)

    at.context["url"] = f"{APP_BASE}/findings"
    _switch(at, "findings").run()
    assert not at.exception and not at.error
    # the page: one "Open the view" button, to the lens view with the state it was saved with
    assert [(b.proto.label, b.proto.url) for b in at.get("link_button")] == [("Open the view", link)]
    assert not any("not into this app" in t.value and "/lens?model=default&" in t.value for t in at.text)
    assert sum("not into this app" in t.value for t in at.text) == len(HOSTILE)
    target = urlsplit(at.get("link_button")[0].proto.url)
    assert (target.scheme, target.netloc, target.path) == ("http", "localhost:8611", "/lens")
    # the exports: the finding's link is live in findings.html and is the CSV's `view`; no hostile one is either
    doc = _download(at, downloads, "Download all as HTML").decode()
    assert _live_hrefs(doc) == [link]
    assert "<code>javascript:alert(1)</code>" in doc
    rows = {r["title"]: r for r in _csv_rows(_download(at, downloads, "Download all as CSV"))}
    assert rows["The lens reads Mary"]["view"] == link and rows["Hostile links"]["view"] == ""


def test_review_mode_opens_the_apps_links_under_a_base_path(own_store, monkeypatch, downloads):
    """A read-only viewer (WORKBENCH_REVIEW_MODE=1) served under a base path: links into the app under that path
    are live on the page and in the exports, links to the same host outside it and hostile ones are not."""
    base = f"{APP_BASE}/wb"
    ours = f"{base}/lens?model=default&prompt=The+capital+of+France+is"
    outside = f"{APP_BASE}/lens?model=default"
    Store(own_store).add_finding("Ours and others", links=[outside, ours, *[h.replace("/lens", "/wb/lens")
                                                                             for h in HOSTILE]])
    monkeypatch.setenv("WORKBENCH_REVIEW_MODE", "1")
    at = AppTest.from_file(APP, default_timeout=120)
    at.context["url"] = f"{base}/findings"
    at.run()
    _switch(at, "findings").run()
    assert not at.exception
    assert any("Review mode" in i.value for i in at.info)
    assert [b.proto.url for b in at.get("link_button")] == [ours]
    doc = _download(at, downloads, "Download all as HTML").decode()
    assert _live_hrefs(doc) == [ours] and f"<code>{html.escape(outside)}</code>" in doc
    assert _csv_rows(_download(at, downloads, "Download all as CSV"))[0]["view"] == ours
