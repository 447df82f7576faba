"""What a reader is told about p-values (issue 26, item 7): the smallest p the sign-flip test can give with the
pairs that ran sits beside the p column (table, CSV, HTML, page), with a note when no node can reach 0.05 — and
nothing extra when one can."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis.stats import sign_flip_floor, sign_flip_min_p, sign_flip_p


def _scipy_sign_flip(d: np.ndarray) -> float:
    """The exact two-sided paired sign-flip p-value by scipy (every sign pattern enumerated)."""
    return scipy_stats.permutation_test((d,), lambda x, axis=-1: x.mean(axis), permutation_type="samples",
                                        n_resamples=np.inf, alternative="two-sided").pvalue


@pytest.mark.parametrize("diffs", [
    [0.3, 1.2, 0.7, 2.0],                    # 4 pairs: 2/16
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],          # 6 ties: still 2/64
    [1.0, 2.0, 0.0, 0.0, 3.0, 4.0],          # two exact zeros: 2/2^4
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    [0.0, 0.0, 0.0],                         # no effect at all: 1
])
def test_the_floor_is_what_the_most_extreme_signs_give(diffs):
    """The floor for a row's magnitudes is the p of its most extreme sign pattern (all one sign), by scipy."""
    d = np.abs(np.asarray(diffs, dtype=np.float64))
    want = _scipy_sign_flip(d)
    assert sign_flip_min_p(d[None])[0] == pytest.approx(want, rel=1e-12)
    assert sign_flip_p(d[None])[0] == pytest.approx(want, rel=1e-12)  # that pattern reaches it
    # and no sign pattern of these magnitudes goes below it
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(64, len(d)))
    assert (sign_flip_p(signs * d) >= sign_flip_min_p(signs * d) - 1e-12).all()


def test_the_design_floor_by_number_of_pairs():
    assert sign_flip_floor(4) == 0.125 and sign_flip_floor(5) == 0.0625
    assert sign_flip_floor(6) == pytest.approx(2 / 64) and sign_flip_floor(8) == pytest.approx(2 / 256)
    assert sign_flip_floor(20) == pytest.approx(1 / 10_000)  # sampled patterns: 1 / (n_perm + 1)
    assert sign_flip_p(np.ones((1, 20)))[0] == pytest.approx(sign_flip_floor(20))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from analysis.store import Store

    return Store(tmp_path_factory.mktemp("pfloor") / "s.duckdb")


def _patching(store, n_pairs: int):
    from analysis.analyses.patching.spec import PatchingSpec
    from analysis.runner import run

    return run(PatchingSpec(n_pairs=n_pairs, components=("z_all_pos",), methods=("activation", "atp")), store=store)


@pytest.mark.parametrize("n_pairs, floor, noted", [(4, 0.125, True), (8, 2 / 256, False)])
def test_patching_tables_csv_and_html_carry_the_floor(store, n_pairs, floor, noted):
    from analysis.analyses.patching.figures import p_floor, top_nodes_with_intervals
    from analysis.export import html_report, item_from_result, to_csv

    out = _patching(store, n_pairs)
    t, meta = out.result.table, out.result.meta
    act = t[t["method"] == "activation"]
    assert meta["n_pairs"] == n_pairs and meta["p_min"] == pytest.approx(floor)
    assert act["p_min"].min() == pytest.approx(floor)
    assert (act["p_value"] >= act["p_min"] - 1e-12).all() and t.loc[t["method"] == "atp", "p_min"].isna().all()
    assert list(t.columns).index("p_min") == list(t.columns).index("p_value") + 1  # beside the p column
    assert ("p_note" in meta) == noted
    if noted:
        assert "cannot give p below 0.125" in meta["p_note"] and (act["p_value"] >= 0.125 - 1e-12).all()
    csv = pd.read_csv(io.BytesIO(to_csv(t)))
    assert csv.loc[csv["method"] == "activation", "p_min"].min() == pytest.approx(floor)
    doc = html_report("r", [item_from_result("r", "patching", out.key, out.spec.to_dict(), out.result)])
    assert "p_min" in doc and ("cannot give p below" in doc) == noted
    shown, note = p_floor(t, meta)
    assert (note != "") == noted
    fig = top_nodes_with_intervals(shown, out.result.extra["per_pair"], out.result.extra["tokens"], "activation",
                                   "z_all_pos")
    assert all(f"the smallest this test can give: {floor:.3g}" in s for s in fig.data[1].text)


def test_a_run_stored_before_the_column_gets_the_floor_on_display():
    from analysis.analyses.patching.figures import p_floor

    old = pd.DataFrame({"method": ["activation", "atp"], "value": [0.5, 0.4], "p_value": [0.125, np.nan]})
    shown, note = p_floor(old, {"n_pairs": 4})
    assert shown["p_min"].iloc[0] == 0.125 and np.isnan(shown["p_min"].iloc[1]) and "0.125" in note
    assert list(shown.columns) == ["method", "value", "p_value", "p_min"]
    shown, note = p_floor(old.assign(p_value=[2 / 256, np.nan]), {"n_pairs": 8})
    assert shown["p_min"].iloc[0] == pytest.approx(2 / 256) and note == ""


@pytest.mark.parametrize("n_pairs, floor, noted", [(4, "0.125", True), (8, "0.0078", False)])
def test_patching_page_shows_the_floor_and_notes_only_when_needed(own_app_store, n_pairs, floor, noted):
    from test_app import _run

    at = _run(page="patching", n_pairs=str(n_pairs), components="z_all_pos", methods="activation")
    assert not at.exception and not at.error
    captions = " ".join(c.value for c in at.caption)
    assert f"with these {n_pairs} pairs: {floor}" in captions
    warnings = [w.value for w in at.warning if "sign-flip test cannot give p below" in w.value]
    assert bool(warnings) == noted
    top = [d.value for d in at.dataframe if "p_min" in d.value.columns][0]
    assert list(top.columns).index("p_min") == list(top.columns).index("p_value") + 1


@pytest.fixture()
def own_app_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "app.duckdb"))
    from analysis.runner import get_store

    get_store.cache_clear()
    yield
    get_store.cache_clear()


# ----------------------------------------------------------------------------------------------------------
# Entropy over training: the legend and the right axis's title (issue 26, item 9)
# ----------------------------------------------------------------------------------------------------------
def _entropy_figure(n_layers: int):
    from analysis.analyses.entropy.figures import entropy_over_training

    rng = np.random.default_rng(0)
    steps = [0, 100, 200, 400]
    heads = pd.DataFrame([dict(layer=layer, head=h, checkpoint=f"step {s}", step=s, norm_entropy=rng.random())
                          for s in steps for layer in range(n_layers) for h in range(2)])
    summary = pd.DataFrame(dict(checkpoint=[f"step {s}" for s in steps], step=steps,
                                mean_predictive_entropy=[8.0, 5.0, 3.0, 2.5]))
    return entropy_over_training(heads, summary)


@pytest.mark.parametrize("n_layers", [6, 30])
def test_entropy_legend_lies_under_the_plot_not_beside_the_right_axis(n_layers):
    fig = _entropy_figure(n_layers)
    legend, y2 = fig.layout.legend, fig.layout.yaxis2
    assert y2.side == "right" and y2.title.text  # the right axis keeps its title
    # rows at the bottom edge of the figure (plotly makes room for them under the x axis), not a column at the right
    assert legend.orientation == "h" and legend.yref == "container" and legend.yanchor == "bottom" and legend.y == 0
    assert legend.xanchor == "left" and legend.x == 0
    assert fig.layout.height >= 420 + 12 * (n_layers + 1 - 8)  # many layers: the plot keeps its height


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_entropy_legend_overlaps_no_axis_title_in_a_browser(tmp_path):
    """Drawn by Chromium at a narrow width: the legend's box meets neither axis title nor the right axis's ticks
    (the legend used to sit on the right axis's title)."""
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "entropy.html"
    page_file.write_text(_entropy_figure(6).to_html(include_plotlyjs=True, default_width="600px"))
    parts = {"legend": ".legend", "right title": ".g-y2title", "right ticks": ".overaxes-above",
             "x title": ".g-xtitle", "title": ".g-gtitle"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(page_file.as_uri())
            page.wait_for_selector(".legend")
            boxes = page.evaluate("""(parts) => Object.fromEntries(Object.entries(parts).map(([k, s]) => {
                const r = document.querySelector(s).getBoundingClientRect();
                return [k, [r.left, r.top, r.right, r.bottom]]; }))""", parts)
        finally:
            browser.close()
    legend = boxes.pop("legend")
    for name, (left, top, right, bottom) in boxes.items():
        apart = right <= legend[0] or legend[2] <= left or bottom <= legend[1] or legend[3] <= top
        assert apart, f"the legend {legend} overlaps the {name} {[left, top, right, bottom]}"
