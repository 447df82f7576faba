"""The Runs page's "Open" link for the analyses the Quantization page shows without a page of their own (its
Hessian traces and bit allocation): issue 26 found a grey "None" there."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from analysis.store import Store


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "app.duckdb"))
    from analysis.runner import get_store

    get_store.cache_clear()
    yield Path(tmp_path / "app.duckdb")
    get_store.cache_clear()


def test_quantization_runs_open_the_quantization_page_at_that_run(own_store):
    from test_app import _qp, _run

    from analysis.analyses.quant.compute import QuantAllocationSpec
    from analysis.runner import get_store, run

    small = dict(n_seqs=2, seq_len=16, max_samples=4, min_samples=2, seed=3)
    run(QuantAllocationSpec(budget_bits=5.25, formats=("int8-channel", "int4-g32"), **small), store=get_store())
    at = _run("views/runs.py")
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    links = dict(zip(table["analysis"], table["open"]))
    assert {"quant_traces", "quant_allocation"} <= set(links)
    for name in ("quant_traces", "quant_allocation"):
        assert isinstance(links[name], str), (name, links[name])  # not a grey "None"
        url = urlparse(links[name])
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        assert url.path == "/quant", links[name]
        assert {k: q[k] for k in small} == {k: str(v) for k, v in small.items()}  # the run's text and traces
        assert q["model"] == "default" and "formats" not in q  # the page's sweep keeps its own formats
    alloc = {k: v[0] for k, v in parse_qs(urlparse(links["quant_allocation"]).query).items()}
    assert alloc["budget_bits"] == "5.25" and alloc["alloc_formats"] == "int8-channel,int4-g32"
    # the link opens the Quantization page with that allocation, read from the store (not computed again)
    page = _run("quant", **alloc)
    assert not page.exception and not page.error, [e.value for e in page.error]
    assert [n.value for n in page.number_input if n.label.startswith("Size budget")] == [5.25]
    assert _qp(page, "budget_bits") == "5.25" and _qp(page, "alloc_formats") == "int8-channel,int4-g32"
    runs = Store(own_store).runs()
    assert (runs["analysis"] == "quant_allocation").sum() == 1 and (runs["analysis"] == "quant_traces").sum() == 1
    assert any("int8-channel, int4-g32" in c.value for c in page.caption)  # the allocation shown is that run's
