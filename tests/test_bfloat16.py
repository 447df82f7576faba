"""Every analysis on a model loaded in bfloat16 (how a 1-3 B model fits one machine): a tiny random Llama, the
small settings below. The 1 B benchmark found analyses that mixed float32 tensors into the bfloat16 model's
matrix products ("mat1 and mat2 must have the same dtype": the tuned lens's read-out, the feature pages' logit
effects) or held float32 tolerances (the circuit's check that heads' results add up); this runs them all."""
from __future__ import annotations

import pytest

from analysis.registry import ANALYSES
from analysis.runner import run
from analysis.specs import PromptSpec
from analysis.store import Store

SAE = dict(width=64, k=4, steps=30, max_tokens=1024, batch_tokens=128, layer=1)
SMALL = {
    "model": {}, "lens": {}, "entropy": {},
    "patching": dict(n_pairs=2),
    "circuit": dict(n_pairs=2, ig_steps=2, n_points=3),
    "circuit_intervention": dict(n_pairs=2, nodes=("a0.h0", "m1"), value="mean"),
    "tuned_lens": dict(steps=3, max_tokens=256, batch_tokens=64),
    "infoplane": dict(n_samples=50),
    "concept_activations": dict(max_sentences=40),
    "probes": dict(max_sentences=40, concepts=("sentiment",)),
    "bottleneck": dict(max_sentences=60, n_random=1, concepts=("sentiment", "topic")),
    "intervention": dict(max_sentences=40, amounts=(-1.0, 1.0)),
    "tcav": dict(n_examples=10, n_random=2, n_inputs=10, layers=(1,)),
    "atlas": dict(max_sentences=40, method="pca", max_points=50),
    "quant_traces": dict(n_seqs=1, seq_len=8, min_samples=2, max_samples=2),
    "quant_sensitivity": dict(formats=("int8-channel",), activation_formats=(), units=("type",), n_seqs=1,
                              seq_len=8, min_samples=2, max_samples=2),
    "quant_allocation": dict(formats=("int8-channel", "int4-g32"), n_seqs=1, seq_len=8, min_samples=2,
                             max_samples=2),
    **{name: dict(SAE, **extra) for name, extra in {
        "sae": {}, "sae_features": dict(top_n=3), "sae_encode": {}, "sae_attribution": dict(n_pairs=1, max_patched=20),
        "sae_steer": dict(generate=2),
        "sae_names": dict(max_sentences=60, n_random=1, concepts=("topic",), min_auroc=0.5)}.items()},
}


def test_every_analysis_has_settings_here():
    assert set(SMALL) == {a.name for a in ANALYSES}


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("bf16") / "s.duckdb")  # shared: the SAE analyses share one SAE


@pytest.mark.parametrize("name", list(SMALL))
def test_every_analysis_runs_on_a_bfloat16_model(name, tiny_dirs, bf16_store):
    from analysis import load_model

    a = next(a for a in ANALYSES if a.name == name)
    folder = str(tiny_dirs["llama"])
    assert load_model(folder, dtype="bfloat16").summary.dtype == "bfloat16"
    fields = dict(SMALL[name])
    if issubclass(a.spec, PromptSpec):
        fields["prompt"] = "The capital of France is"
    out = run(a.spec(model=folder, dtype="bfloat16", **fields), store=bf16_store)
    assert len(out.result.table) > 0 and out.spec.dtype == "bfloat16"
