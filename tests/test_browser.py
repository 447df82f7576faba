"""One real-browser test: the app served by `streamlit run`, driven by Playwright in Debian's Chromium."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (.ci/run installs it)")


PIXEL = "![x](http://tracker.example/pixel.png)"
SERVER_STORE: dict = {}  # the server's store file (its runs are read back by the tests)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    store = tmp_path_factory.mktemp("browser") / "store.duckdb"
    SERVER_STORE["path"] = store
    from analysis.store import Store

    Store(store).add_finding(f"Result {PIXEL}", notes=f"see {PIXEL} or http://elsewhere.example",
                             author="[ada](http://elsewhere.example)", links=["javascript:alert(1)"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "WORKBENCH_STORE": str(store)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("streamlit did not start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def page():
    """A fresh page in Debian's Chromium, with the flags this machine's closed network needs."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium must be installed in CI"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def test_app_renders_in_a_real_browser(server, page, tmp_path):
    page.goto(f"{server}/?prompt=The+capital+of+France+is&k=5")
    page.get_by_text("Next-token predictions").wait_for(timeout=90_000)
    page.get_by_text("Attention pattern").wait_for(timeout=30_000)
    page.wait_for_timeout(1500)
    shot = tmp_path / "model-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("WORKBENCH_SCREENSHOT"):  # keep it to look at
        shutil.copy(shot, os.environ["WORKBENCH_SCREENSHOT"])
    assert page.locator("[data-testid='stException']").count() == 0
    body = page.inner_text("body")
    assert "Traceback" not in body
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    assert "Paris" in page.content()  # the prediction bar chart (plotly SVG) names the answer
    # the sidebar model picker is there and the URL carries the model
    assert page.locator("[data-testid='stSidebar']").get_by_text("Dtype").count() >= 1
    assert "model=default" in page.url


def test_deep_link_to_a_page_runs_through_the_app(server, page):
    """A copied link to /patching opens that page inside the app (sidebar and model picker included), not the
    page script on its own."""
    page.goto(f"{server}/patching?n_pairs=2&components=resid_pre&methods=activation,relp")
    page.get_by_text("Faithfulness: each estimator").wait_for(timeout=120_000)
    # the sidebar's model picker is part of the page (it may still be re-rendering: wait for it)
    page.locator("[data-testid='stSidebar']").get_by_text("Dtype").first.wait_for(timeout=60_000)
    assert page.locator("[data-testid='stException']").count() == 0
    assert "Pick a model" not in page.inner_text("body")


def test_findings_fetch_nothing_from_elsewhere_and_link_nowhere_else(server, page):
    """A finding's image link was fetched by every reader's browser, and Streamlit's Markdown turns a URL into a
    live link even when its characters are escaped: the page must request nothing from another host and hold no
    link out of the app."""
    elsewhere = []
    page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None)
    page.goto(f"{server}/findings")
    page.get_by_text("Download all as HTML").wait_for(timeout=90_000)
    page.wait_for_timeout(2000)
    main = page.locator("[data-testid='stMain']")
    assert "tracker.example/pixel.png" in main.inner_text().replace("\u200b", "")  # shown, as typed
    assert main.locator("img").count() == 0 and main.locator("a[href^='http'], a[href^='javascript']").count() == 0
    assert elsewhere == []


def test_closing_the_tab_stops_its_run(server, page, tmp_path):
    """A run whose tab has closed used to run on (holding the model for everyone): its progress callback now
    stops it, and nothing is stored."""
    from analysis.analyses.patching.spec import PatchingSpec
    from analysis.runner import run
    from analysis.store import Store

    query = dict(n_pairs=32, components="resid_pre,z_by_pos,pattern_by_pos", methods="activation,atp")
    spec = PatchingSpec.from_dict(query)
    t0 = time.perf_counter()
    run(spec, store=Store(tmp_path / "alone.duckdb"))  # how long the whole run takes here
    whole = time.perf_counter() - t0
    from urllib.parse import urlencode

    page.goto(f"{server}/patching?{urlencode(query)}")
    page.locator("[data-testid='stProgress']").get_by_text("activation").first.wait_for(timeout=120_000)  # sweeping
    page.close()
    time.sleep(2 * whole + 5)  # long past when it would have finished
    runs = Store(SERVER_STORE["path"]).runs("patching")
    assert not any(json.loads(s).get("n_pairs") == 32 for s in runs["spec"]), "the abandoned run was stored"


def test_a_long_run_shows_its_time_left_joins_a_second_run_press_and_stops(server, page):
    """Every long run shows what it is doing, the time so far and the time left; pressing Run again while it runs
    joins it (it used to start it over); Stop cancels it: nothing stored, the model free for the next run."""
    import re
    from urllib.parse import urlencode

    from analysis.store import Store

    query = dict(n_pairs=64, components="resid_pre,z_by_pos,pattern_by_pos,attn_out,mlp_out", methods="activation,atp")
    page.goto(f"{server}/patching?{urlencode(query)}")
    bar = page.locator("[data-testid='stProgress']").first
    bar.get_by_text("so far").wait_for(timeout=300_000)  # minutes when the other worker loads the CPU (CI)
    page.wait_for_timeout(3000)
    page.get_by_role("button", name="Run", exact=True).click()  # a second press while it runs
    page.wait_for_timeout(1500)
    text = bar.inner_text()
    assert "left" in text, text
    so_far = int(re.search(r"(\d+) s so far", text).group(1))
    assert so_far >= 4, text  # the run's own clock: joined, not started over
    page.get_by_test_id("stButton").get_by_role("button", name="Stop").click()  # ours, not the header's
    page.get_by_text("Stopped: nothing was stored.").wait_for(timeout=60_000)
    assert page.locator("[data-testid='stProgress']").count() == 0
    page.wait_for_timeout(3000)
    runs = Store(SERVER_STORE["path"]).runs("patching")
    assert not any(json.loads(s).get("n_pairs") == 64 for s in runs["spec"]), "the stopped run was stored"
    page.goto(f"{server}/lens?prompt=Stopped+runs+free+the+model")  # the model is free: the next run completes
    page.get_by_text("Top tokens at one cell").wait_for(timeout=120_000)
    assert page.locator("[data-testid='stException']").count() == 0


def test_a_model_switch_tokenises_the_text_again(server, page, tmp_path):
    """Switching the sidebar's model on /lens kept the link's token ids and ran them under the new model's
    tokenizer; now the page says the text was tokenised again, and the link's ids and tokenizer are the new
    model's (its ids decode to the prompt)."""
    from urllib.parse import parse_qs, urlparse

    from tiny_models import save_foreign_tokenizer_model

    from analysis import load_model

    foreign = str(save_foreign_tokenizer_model(tmp_path / "foreign"))
    prompt = "The capital of France is"
    page.goto(f"{server}/lens?prompt=The+capital+of+France+is&targets=+Paris")
    page.get_by_text("Top tokens at one cell").wait_for(timeout=120_000)
    page.wait_for_function("() => location.search.includes('tok=')", timeout=30_000)
    before = parse_qs(urlparse(page.url).query)
    sidebar = page.locator("[data-testid='stSidebar']")
    sidebar.locator("[data-testid='stSelectbox']").first.click()
    page.get_by_role("option", name="Hugging Face id or local folder…").click()
    box = sidebar.get_by_label("Hugging Face id or folder")
    box.fill(foreign)
    box.press("Enter")
    page.get_by_text("tokenised again").wait_for(timeout=120_000)
    page.wait_for_function(f"() => location.search.includes('tok={load_model(foreign).tokenizer_fingerprint}')",
                           timeout=60_000)
    after = parse_qs(urlparse(page.url).query)
    assert after["token_ids"] != before["token_ids"]
    tok = load_model(foreign).tokenizer
    ids = [int(i) for i in after["token_ids"][0].split(",")]
    assert tok.decode([i for i in ids if i != tok.bos_token_id]) == prompt
    assert page.locator("[data-testid='stException']").count() == 0
