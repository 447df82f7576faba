"""Entropy tracking: the attention-entropy kernel against analytic values and a brute-force loop, and the
analysis over the default model's shipped checkpoints and the three test architectures."""
from __future__ import annotations

import math

import pytest
import torch

from kernels.entropy import attention_entropy


def test_attention_entropy_analytic_and_brute_force():
    P = 6
    uniform = torch.tril(torch.ones(P, P))
    uniform = uniform / uniform.sum(-1, keepdim=True)  # each query spreads evenly over the keys it sees
    ent, norm = attention_entropy(uniform[None])
    assert torch.allclose(ent[0], torch.log(torch.arange(1, P + 1).float()), atol=1e-6)
    assert torch.isnan(norm[0, 0]) and torch.allclose(norm[0, 1:], torch.ones(P - 1), atol=1e-6)
    first = torch.zeros(P, P)
    first[:, 0] = 1.0  # every query on the first key: collapsed
    ent, norm = attention_entropy(first[None])
    assert torch.allclose(ent, torch.zeros(1, P), atol=1e-6) and torch.allclose(norm[0, 1:], torch.zeros(P - 1))
    torch.manual_seed(0)
    scores = torch.randn(2, 3, P, P).masked_fill(~torch.tril(torch.ones(P, P, dtype=torch.bool)), -float("inf"))
    pat = scores.softmax(-1)
    ent, norm = attention_entropy(pat)
    for b in range(2):
        for h in range(3):
            for i in range(P):
                e = -sum(float(pat[b, h, i, j]) * math.log(float(pat[b, h, i, j])) for j in range(i + 1))
                assert abs(e - float(ent[b, h, i])) < 1e-5
                if i:
                    assert abs(e / math.log(i + 1) - float(norm[b, h, i])) < 1e-5


def test_entropy_over_the_default_models_checkpoints(tmp_path):
    """Out of the box: the six shipped checkpoints and the final model. Attention sharpens as the model learns
    IOI and induction (heads collapse), and its predictions grow more certain."""
    from analysis.analyses.entropy.compute import EntropySpec
    from analysis.runner import run
    from analysis.store import Store

    out = run(EntropySpec(prompt="Then, John and Mary went to the store. John gave a ring to"),
              store=Store(tmp_path / "s.duckdb"))
    s = out.result.extra["over_training"].sort_values("step")
    assert list(s["step"]) == [100, 250, 500, 1000, 2000, 3000, 4000]
    assert s["collapsed_heads"].iloc[0] == 0 and s["collapsed_heads"].iloc[-1] >= 2
    assert s["mean_norm_entropy"].iloc[0] > s["mean_norm_entropy"].iloc[-1] + 0.2
    assert s["mean_predictive_entropy"].iloc[0] > s["mean_predictive_entropy"].iloc[-1]
    heads = out.result.table
    assert len(heads) == 7 * 6 * 4 and heads["norm_entropy"].between(0, 1 + 1e-6).all()
    pred = out.result.extra["predictive"]
    final = pred[(pred["step"] == 4000) & (pred["layer"] == 5)]
    n_fork = int(final["forking"].sum())
    assert 1 <= n_fork <= len(final) // 2
    assert final.loc[final["forking"], "entropy"].min() >= final.loc[~final["forking"], "entropy"].max()
    models = out.result.extra["models"]
    assert models["fingerprint"].nunique() == 7  # every checkpoint is its own weights


def test_entropy_runs_on_three_architectures_and_refuses_mixed_vocabularies(tiny_dirs, tmp_path):
    from analysis import WorkbenchError
    from analysis.analyses.entropy.compute import EntropySpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    for arch, folder in tiny_dirs.items():
        out = run(EntropySpec(model=str(folder), prompt="The capital of France is"), store=store)
        heads = out.result.table
        assert out.result.meta["steps"] == [None] and out.result.meta["checkpoints"] == [str(folder)], arch
        assert heads["norm_entropy"].notna().all(), arch
        assert len(heads) == 2 * 4, arch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from analysis.models import DEFAULT_MODEL_DIR

    other = tmp_path / "other-vocab"  # a model with another vocabulary is no checkpoint of the default model
    GPT2LMHeadModel(GPT2Config(vocab_size=2000, n_layer=1, n_head=2, n_embd=16)).save_pretrained(other)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(other)
    n = store.count()
    with pytest.raises(WorkbenchError, match="not checkpoints of one model"):
        run(EntropySpec(prompt="The capital of France is", checkpoints=("default", str(other))), store=store)
    assert store.count() == n
