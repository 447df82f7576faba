"""N people at once on one server: concurrent browser sessions through every page (issue 15).

    python benchmarks/load.py [--sessions 1,2,4,8] [--timeout 600]

For each N a fresh `streamlit run app.py` on 127.0.0.1 with a fresh store, and N browser sessions (Playwright
contexts in Debian's Chromium: separate Streamlit sessions) that each walk every page with settings of their own
(their own prompt, seed or size, so that the sessions compute at the same time rather than read each other's
results). Per page visit: the time from opening the link to its first figure, and whether the page showed an
exception, a traceback or an error box. Per N: completed visits, errors, median and worst time to first figure,
the server's memory (RSS, with its children) before the sessions and after. Then every run the N = max sessions
stored is recomputed by one user alone, in this process, into a fresh store, and compared table by table: the
number of runs whose result differs is the last figure. Exits 1 on any error or difference.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPTS = ["The capital of France is", "The capital of Japan is", "Then, John and Mary went to the store. John gave "
           "a ring to", "The weather is very", "The concert was very", "The capital of Italy is",
           "Then, Emma and Frank went to the park. Emma gave a ball to", "The capital of Spain is"]


def pages_for(i: int) -> list[tuple[str, dict]]:
    """The pages session i walks, each with settings of its own (small enough for 2 CPU cores)."""
    p = PROMPTS[i % len(PROMPTS)]
    pages = [
        ("", {"prompt": p, "top_k": 5}),
        ("patching", {"n_pairs": 2 + i % 3, "components": "resid_pre", "methods": "activation,atp"}),
        ("lens", {"prompt": p}),
        ("entropy", {"prompt": p, "checkpoints": "data/checkpoints/step-02000,default"}),
        ("infoplane", {"n_samples": 60 + 10 * i, "checkpoints": "default"}),
        ("concepts", {"section": "probes", "max_sentences": 200 + 20 * i, "concepts": "sentiment"}),
        ("quant", {"formats": "int8-channel", "n_seqs": 2, "seq_len": 16, "max_samples": 4, "seed": i}),
        ("findings", {}),
        ("runs", {}),
    ]
    return pages[i % len(pages):] + pages[:i % len(pages)]  # each session starts elsewhere


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "WORKBENCH_STORE": str(store), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless",
                             "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--server.fileWatcherType", "none"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("streamlit did not start")


async def visit(ctx, url: str, timeout_s: float, listing: bool) -> dict:
    """Open one link; a listing page (Findings, Runs) counts when its title shows, an analysis page at its first
    figure and then once its run's status line (Share and export) is there."""
    page = await ctx.new_page()
    t0 = time.perf_counter()
    out = {"url": url}
    try:
        await page.goto(url, timeout=timeout_s * 1000)
        figure = page.locator("h1" if listing else ".js-plotly-plot").first
        problem = page.locator("[data-testid='stException'], [data-testid='stAlertContentError']").first
        await page.locator("[data-testid='stSidebar']").first.wait_for(timeout=timeout_s * 1000)
        deadline = t0 + timeout_s
        while time.perf_counter() < deadline:
            if await problem.count():
                out["error"] = (await problem.inner_text())[:300]
                break
            if await figure.count() and await figure.is_visible():
                out["first_figure_s"] = time.perf_counter() - t0
                break
            await asyncio.sleep(0.25)
        else:
            out["error"] = "no figure before the timeout"
        if "error" not in out:  # let the page finish (a run's status line) and look for late problems
            if not listing:
                await page.get_by_text("Share and export").first.wait_for(timeout=timeout_s * 1000)
            await page.wait_for_timeout(500)
            if await problem.count():
                out["error"] = (await problem.inner_text())[:300]
            elif "Traceback" in await page.inner_text("body"):
                out["error"] = "a traceback on the page"
    except Exception as e:  # noqa: BLE001 - a page that never loaded is an error of this run
        out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        await page.close()
    return out


async def session(browser, base: str, i: int, timeout_s: float) -> list[dict]:
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
    results = []
    for path, query in pages_for(i):
        results.append(await visit(ctx, f"{base}/{path}" + (f"?{urlencode(query)}" if query else ""), timeout_s,
                                   listing=path in ("findings", "runs")))
    await ctx.close()
    return results


async def drive(base: str, n: int, timeout_s: float) -> list[dict]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            per = await asyncio.gather(*[session(browser, base, i, timeout_s) for i in range(n)])
        finally:
            await browser.close()
    return [v for s in per for v in s]


def compare_with_single_user(store_path: Path) -> tuple[int, int, list[str]]:
    """(runs compared, runs differing, what differed): every stored run recomputed alone into a fresh store."""
    import numpy as np
    import pandas as pd

    from analysis.registry import get_analysis
    from analysis.runner import run
    from analysis.store import Store

    loaded = Store(store_path)
    runs = loaded.runs()
    fresh = Store(Path(tempfile.mkdtemp()) / "alone.duckdb")
    differ = []
    for row in runs.itertuples():
        spec = get_analysis(row.analysis).spec.from_dict(json.loads(row.spec))
        alone = run(spec, store=fresh)
        if alone.key != row.key:
            differ.append(f"{row.analysis}: key {row.key[:8]} alone {alone.key[:8]}")
            continue
        got = loaded.get(row.key)
        for name, want in alone.result.tables().items():
            have = got.tables().get(name)
            if have is None or list(have.columns) != list(want.columns) or len(have) != len(want):
                differ.append(f"{row.analysis} {row.key[:8]} {name}: shape")
                break
            num = want.select_dtypes("number").columns
            if len(num) and not np.allclose(have[num].to_numpy(float), want[num].to_numpy(float), rtol=1e-4,
                                            atol=1e-5, equal_nan=True):
                worst = float(np.nanmax(np.abs(have[num].to_numpy(float) - want[num].to_numpy(float))))
                differ.append(f"{row.analysis} {row.key[:8]} {name}: max abs diff {worst:.2e}")
                break
            other = [c for c in want.columns if c not in num and want[c].map(
                lambda v: isinstance(v, (str, bool, type(None)))).all()]
            if other and not have[other].astype(str).equals(want[other].astype(str)):
                differ.append(f"{row.analysis} {row.key[:8]} {name}: text columns")
                break
    del pd
    return len(runs), len(differ), differ


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    if CHROMIUM is None:
        print("Debian's chromium is not installed (apt-get install chromium)")
        return 2
    ns = [int(x) for x in args.sessions.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; pages per session: {len(pages_for(0))}")
    print(f"{'N':>2} {'visits':>6} {'errors':>6} {'median s':>9} {'worst s':>8} {'RSS before':>11} {'RSS after':>10}")
    failures, last_store = [], None
    for n in ns:
        store = Path(tempfile.mkdtemp()) / "load.duckdb"
        proc, base = start_server(store)
        try:
            urllib.request.urlopen(f"{base}/", timeout=30).read()
            before = rss_mib(proc.pid)
            t0 = time.perf_counter()
            visits = asyncio.run(drive(base, n, args.timeout))
            wall = time.perf_counter() - t0
            after = rss_mib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        times = [v["first_figure_s"] for v in visits if "first_figure_s" in v and "error" not in v]
        errors = [v for v in visits if "error" in v]
        print(f"{n:>2} {len(times):>6} {len(errors):>6} {statistics.median(times) if times else float('nan'):>9.1f} "
              f"{max(times) if times else float('nan'):>8.1f} {before:>9.0f} MiB {after:>7.0f} MiB  ({wall:.0f} s)")
        for e in errors:
            print(f"     error: {e['url']}: {e['error']}")
        failures += errors
        last_store = store
    compared, n_diff, what = compare_with_single_user(last_store)
    print(f"N = {ns[-1]}: {compared} stored runs recomputed by one user alone: {n_diff} differ")
    for w in what:
        print(f"     {w}")
    return 1 if failures or n_diff else 0


if __name__ == "__main__":
    sys.exit(main())
