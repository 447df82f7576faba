"""Concept activations and probes on the default model's shipped concept sentences."""
from __future__ import annotations

import numpy as np

from analysis.concepts import ConceptActivationsSpec, ProbeSpec, activations_array
from analysis.runs import run
from analysis.store import Store


def test_stored_activations_are_the_models_residuals(default_handle, tmp_path):
    import torch

    out = run(ConceptActivationsSpec(max_sentences=40), store=Store(tmp_path / "s.duckdb"))
    acts = activations_array(out.result)
    labels = out.result.extra["labels"]
    assert acts.shape == (40, 7, 128) and len(labels) == 40
    from analysis.concepts import _sentences

    ids = _sentences(40)[7]["ids"]
    with torch.no_grad():
        _, cache = default_handle.bridge.run_with_cache(torch.tensor([ids]))
    want = cache["blocks.3.hook_resid_post"][0, -1].numpy()  # layer 3, last token
    assert np.allclose(acts[7, 4], want, atol=1e-5)


def test_probes_find_the_concepts_and_the_control_task_stays_at_chance(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    for position, must_reach in (("last", ("tense", "number")), ("mean", ("sentiment", "tense", "number"))):
        out = run(ProbeSpec(position=position), store=store)
        t = out.result.table
        best = t.groupby("concept")["accuracy"].max()
        for concept in must_reach:
            assert best[concept] >= 0.9, (position, concept, best[concept])
        assert ((t["control_accuracy"] - t["chance"]).abs() < 0.1).all(), position
        assert (t["selectivity"] == t["accuracy"] - t["control_accuracy"]).all()
    # the activations are a stored run of their own: the second probe set reused them
    assert len(store.runs("concept_activations")) == 2  # one per position
