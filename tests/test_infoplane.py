"""The information-plane analysis: over the default model's shipped checkpoints, on the three architectures, and
bad input."""
from __future__ import annotations

import pytest

from analysis import WorkbenchError
from analysis.analyses.infoplane.compute import InfoPlaneSpec
from analysis.runner import run
from analysis.store import Store


def test_information_plane_over_the_shipped_checkpoints(tmp_path):
    out = run(InfoPlaneSpec(n_samples=300), store=Store(tmp_path / "s.duckdb"))
    t = out.result.table
    assert out.result.meta["steps"] == [100, 250, 500, 1000, 2000, 3000, 4000]
    assert len(t) == 7 * 6 * 2 and t[["entropy", "i_xt", "i_ty"]].notna().all().all()
    renyi = t[t["estimator"] == "renyi"]
    # properties of the matrix-based functional: 0 <= I(A;B) <= min(S(A), S(B))
    assert (renyi["i_ty"] >= -1e-9).all() and (renyi["i_xt"] >= -1e-9).all()
    assert (renyi["i_ty"] <= renyi[["entropy", "h_y"]].min(axis=1) + 1e-9).all()
    assert (renyi["i_xt"] <= renyi["entropy"] + 1e-9).all()
    # the trained model's last layer says more about the next token than the step-100 model's
    last = renyi[renyi["layer"] == 5].set_index("step")["i_ty"]
    assert last[4000] > last[100] + 0.1
    assert "not Shannon information" in out.result.meta["caveat"]
    from analysis.registry import REGISTRY

    plane = REGISTRY["infoplane"].figures(out.result)["plane"]  # one trajectory per layer, a marker per checkpoint
    assert len(plane.data) == 6 and all(len(tr.x) == 7 for tr in plane.data)


def test_information_plane_on_three_architectures(tiny_dirs, tmp_path):
    store = Store(tmp_path / "s.duckdb")
    for arch, folder in tiny_dirs.items():
        out = run(InfoPlaneSpec(model=str(folder), n_samples=100, target="sentiment"), store=store)
        t = out.result.table
        assert out.result.meta["steps"] == [None] and len(t) == 2 * 2, arch
        assert t[["entropy", "i_xt", "i_ty"]].notna().all().all(), arch


@pytest.mark.parametrize("fields, message", [
    ({"dataset": "text", "text": "  "}, "Give some text"),
    ({"dataset": "text", "text": "The capital of France is Paris.", "target": "tense"}, "only for the shipped"),
    ({"dataset": "text", "text": "The capital of France is Paris."}, "at least 50"),
])
def test_bad_information_plane_input(tmp_path, fields, message):
    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(WorkbenchError, match=message):
        spec = InfoPlaneSpec(**fields)
        spec.validate()
        run(spec, store=store)
    assert store.count() == 0
