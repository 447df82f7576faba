"""The Features page's Steering section (issue 26, item 8): it starts from the feature the Feature pages show, its
default strength is scaled to that feature so that it visibly moves the output of the default model, a link's
explicit strength is kept, and only the fields that apply to the chosen kind of steering are shown."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_app import SMALL_SAE, _errors, _qp, _run

from analysis.analyses.features.sae import SAESpec, sae_from_result
from analysis.analyses.features.steer import STRENGTH_MULTIPLE, SteerSpec, default_strength, strongest_live_feature
from analysis.runner import run
from analysis.store import Store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return tmp_path_factory.mktemp("steer") / "app.duckdb"  # one small SAE for the module's page runs


@pytest.fixture(autouse=True)
def app_store(store_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STORE", str(store_path))
    from analysis.runner import get_store

    get_store.cache_clear()
    yield Store(store_path)
    get_store.cache_clear()


def _sae(at, store):
    """The SAE the page ran (from the store: the page's spec, read back from its link)."""
    spec = SAESpec.from_dict({k: _qp(at, k) for k in SAESpec.field_names() if _qp(at, k) is not None})
    out = run(spec, store=store)
    assert out.hit
    return out.result


def _steer_run(at, store):
    """The steering run the page showed (from the store, by its link)."""
    spec = SteerSpec.from_dict({k: _qp(at, k) for k in SteerSpec.field_names() if _qp(at, k) is not None})
    out = run(spec, store=store)
    assert out.hit
    return out


def _widget(at, kind: str, label: str):
    found = [w for w in at.get(kind) if w.label == label]
    assert len(found) == 1, f"{len(found)} {kind} labelled {label!r}"
    return found[0]


def _labels(at) -> set[str]:
    return {w.label for kind in ("number_input", "slider", "text_input", "radio", "selectbox") for w in at.get(kind)}


def _kl_by_transformers(handle, sae_result, ids: list[int], feature: int, strength: float) -> float:
    """KL(before || after) at the last position with strength x the feature's unit decoder direction added to the
    residual after block 2 at every position after BOS, by a hook on the plain transformers model."""
    sae, _ = sae_from_result(sae_result)
    direction = sae.W_dec[feature].detach() / sae.W_dec[feature].detach().norm()
    hf = handle.bridge.original_model

    def push(mod, inp, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[0, 1:] += strength * direction
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    with torch.no_grad():
        before = hf(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        hook = hf.transformer.h[2].register_forward_hook(push)
        try:
            after = hf(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        finally:
            hook.remove()
    return float((before.exp() * (before - after)).sum())


def test_steering_starts_from_the_viewed_feature_with_a_strength_that_moves_the_output(app_store, default_handle):
    at = _run("features", section="sae_features", **SMALL_SAE)
    assert not at.exception and not at.error, _errors(at)
    table = _sae(at, app_store).table
    live = table[table["max_activation"] > 0].sort_values("max_activation")
    typical = int(live["feature"].iloc[len(live) // 2])  # a live feature of median strength
    at.number_input(key="feature").set_value(typical).run()  # the feature a person is reading about
    assert not at.exception and _qp(at, "feature") == str(typical)
    at.radio(key="section").set_value("sae_steer").run()
    assert not at.exception and not at.error, _errors(at)
    assert _widget(at, "number_input", "Feature").value == typical
    want = default_strength(table, typical)
    row = table[table["feature"] == typical].iloc[0]
    assert want == pytest.approx(STRENGTH_MULTIPLE * max(row["max_activation"] * row["decoder_norm"],
                                                          (live["max_activation"] * live["decoder_norm"]).median()),
                                 abs=0.25)
    assert at.slider[0].value == want and want != 8.0
    out = _steer_run(at, app_store)
    assert out.spec.feature == typical and out.spec.strength == want and f"feature {typical}'s" in out.result.meta[
        "steered"]
    kl = out.result.meta["kl_before_after"]
    assert kl >= 0.05  # a visible change (the old default, 8, moved feature 0 by 0.0003 nats)
    assert kl == pytest.approx(_kl_by_transformers(default_handle, _sae(at, app_store), list(out.spec.token_ids),
                                                   typical, want), rel=1e-3, abs=1e-5)
    assert np.abs(out.result.table["change"]).max() > 0.01  # bars that move

    # a default strength follows the feature: another one chosen gets its own (shown, run and linked)
    other = int(live["feature"].iloc[-1])
    at.number_input(key="steer_feature").set_value(other).run()
    assert not at.exception and not at.error, _errors(at)
    assert at.slider[0].value == default_strength(table, other) != want
    assert _qp(at, "feature") == str(other) and float(_qp(at, "strength")) == default_strength(table, other)
    # a strength a person set is theirs: it stays when the feature changes
    at.slider[0].set_value(2.5)
    _widget(at, "button", "Steer").click().run()
    at.number_input(key="steer_feature").set_value(typical).run()
    assert not at.exception and at.slider[0].value == 2.5 and _steer_run(at, app_store).spec.strength == 2.5


def test_steering_without_a_viewed_feature_opens_on_the_strongest_and_keeps_a_links_strength(app_store):
    at = _run("features", section="sae_steer", **SMALL_SAE)
    assert not at.exception and not at.error, _errors(at)
    table = _sae(at, app_store).table
    strongest = strongest_live_feature(table)
    assert strongest == int(table.loc[table["max_activation"].idxmax(), "feature"]) and strongest != 0
    assert _widget(at, "number_input", "Feature").value == strongest and _qp(at, "feature") == str(strongest)
    assert at.slider[0].value == default_strength(table, strongest)
    # a link's explicit strength is kept (here a small one, far from the default)
    at = _run("features", section="sae_steer", feature=str(strongest), strength="1.5", **SMALL_SAE)
    assert not at.exception and at.slider[0].value == 1.5 and _qp(at, "strength") == "1.5"


def test_steering_shows_only_the_fields_that_apply(app_store):
    at = _run("features", section="sae_steer", feature="2", **SMALL_SAE)
    assert not at.exception and not at.error, _errors(at)
    shown = _labels(at)
    assert {"Feature", "Mode", "Direction", "Where", "Generate"} <= shown
    assert any(s.startswith("Strength") for s in shown)
    assert not {"Concept", "Toward", "Concept data ('shipped' or an uploaded CSV's id)"} & shown
    # clamping: the strength is what the activation is clamped to; ablating: there is no strength
    _widget(at, "radio", "Mode").set_value("clamp").run()
    assert not at.exception and "Clamp the feature's activation to" in _labels(at)
    table = _sae(at, app_store).table
    assert at.slider[0].value == default_strength(table, 2, mode="clamp") and _qp(at, "mode") == "clamp"
    _widget(at, "radio", "Mode").set_value("ablate").run()
    assert not at.exception and not at.slider and "ablated" in _steer_run(at, app_store).result.meta["steered"]
    # a probe direction: its concept fields, no feature and no mode (a probe is added). Its data set does not exist
    # here, so the run stops with a message after the fields are drawn (a probe run would train probes first)
    at = _run("features", section="sae_steer", steer_with="probe", dataset="no_such_data", **SMALL_SAE)
    assert not at.exception
    shown = _labels(at)
    assert {"Concept", "Toward", "Direction", "Concept data ('shipped' or an uploaded CSV's id)"} <= shown
    assert not {"Feature", "Mode"} & shown and any(s.startswith("Strength") for s in shown)
    assert at.error  # the unknown data set's message
