"""Lens statistics: the blocked kernel against the full-tensor computation, and the lens at the last layer against
the model's own output on the default model and the three test architectures."""
from __future__ import annotations

import pytest
import torch

from kernels.lens import lens_stats, naive_lens_stats


@pytest.mark.parametrize("vocab_block, row_block, cap", [(7, 1, None), (128, 5, None), (1000, 64, None),
                                                         (333, None, None), (7, 1, 10.0), (333, None, 10.0)])
def test_blocked_statistics_equal_the_full_tensor(vocab_block, row_block, cap):
    """With `cap`: the model's logits soft-capped (Gemma 2: cap * tanh(z / cap)), not affine in the residual."""
    torch.manual_seed(0)
    N, d, V = 40, 16, 1000
    x, W, b = torch.randn(N, d) * 2, torch.randn(d, V), torch.randn(V)
    ref, ref_index = torch.randn(6, d) * 2, torch.randint(0, 6, (N,))
    ref_index[:6] = torch.arange(6)
    x[:6] = ref  # rows equal to their reference: KL 0
    targets = torch.randint(0, V, (N, 3))
    transform = None if cap is None else (lambda z: cap * torch.tanh(z / cap))
    got = lens_stats(x, W, b, ref=ref, ref_index=ref_index, targets=targets, k=7, vocab_block=vocab_block,
                     row_block=row_block, transform=transform)
    want = naive_lens_stats(x, W, b, ref=ref, ref_index=ref_index, targets=targets, k=7, transform=transform)
    if cap is not None:  # the cap is reached and changes the distribution
        z = x @ W + b
        assert z.abs().max() > 2 * cap
        assert torch.allclose(want.lse, torch.logsumexp(cap * torch.tanh(z / cap), -1))
        assert not torch.allclose(want.lse, torch.logsumexp(z, -1), atol=1e-2)
    assert got.kl[:6].abs().max() < 1e-5
    for field in ("lse", "entropy", "kl", "target_logprob", "top_logprob"):
        assert torch.allclose(getattr(got, field), getattr(want, field), atol=1e-4, rtol=1e-5), field
    assert torch.equal(got.target_rank, want.target_rank)
    assert torch.equal(got.top_ids, want.top_ids)
    assert (want.kl >= -1e-5).all() and want.entropy.max() <= torch.log(torch.tensor(float(V))) + 1e-4


def test_analytic_values():
    """Uniform logits: entropy log V, every rank 0 ties broken as 'strictly above' (rank 0), KL to itself 0;
    a one-hot-like row: entropy ~0, the hot token's rank 0 and log-probability ~0."""
    V, d = 50, 4
    W = torch.zeros(d, V)
    b = torch.zeros(V)
    x = torch.randn(3, d)
    st = lens_stats(x, W, b, ref=x, ref_index=torch.arange(3), targets=torch.tensor([[0], [5], [49]]),
                    vocab_block=16)
    assert torch.allclose(st.entropy, torch.full((3,), torch.log(torch.tensor(50.0)).item()), atol=1e-5)
    assert torch.allclose(st.kl, torch.zeros(3), atol=1e-6) and (st.target_rank == 0).all()
    b_hot = torch.zeros(V)
    b_hot[17] = 60.0
    hot = lens_stats(x, W, b_hot, targets=torch.tensor([[17], [3], [17]]), vocab_block=16)
    assert hot.entropy.max() < 1e-6 and hot.target_rank[0, 0] == 0 and hot.target_rank[1, 0] == 1
    assert hot.target_logprob[0, 0].abs() < 1e-6 and (hot.top_ids[:, 0] == 17).all()


def test_lens_at_the_last_layer_is_the_models_output(default_handle, tiny_dirs):
    from analysis import load_model

    for handle in [default_handle] + [load_model(str(f)) for f in tiny_dirs.values()]:
        bridge = handle.bridge
        L = bridge.cfg.n_layers
        tokens = torch.tensor([[0, 343, 12, 543, 270, 558, 300, 22, 91, 15]])
        name = f"blocks.{L - 1}.hook_resid_post"
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == name)
            x = bridge.ln_final(cache[name][0])  # the final norm recomputed on the last residual
            st = lens_stats(x, bridge.W_U, bridge.b_U, vocab_block=100)
        model_logp = logits[0].float().log_softmax(-1)
        lens_logp_top = st.top_logprob
        assert torch.allclose(lens_logp_top, model_logp.topk(5, -1).values, atol=1e-5), handle.name
        kl = (model_logp.exp() * (model_logp - (x.float() @ bridge.W_U.float() + bridge.b_U.float())
                                  .log_softmax(-1))).sum(-1)
        assert kl.max().item() < 1e-5, handle.name


def test_logit_lens_analysis_on_three_architectures(default_handle, tiny_dirs, tmp_path):
    """Through the pipeline: the last layer's resid_post is the model's output (KL < 1e-5); every cell is a
    distribution; the targets' probabilities agree with the top-k table; resid_mid is left out on NeoX."""
    from analysis.analyses.lens.spec import LensSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    for name in ["default"] + [str(f) for f in tiny_dirs.values()]:
        out = run(LensSpec(model=name, prompt="The capital of France is a city where", targets=(" Paris",),
                           top_k=5), store=store)
        t = out.result.table
        last = t[(t["site"] == "resid_post") & (t["layer"] == t["layer"].max())]
        assert last["kl_to_final"].abs().max() < 1e-5, name
        assert (last["final_rank"] == 0).all() and (last["top_token"] == last["final_token"]).all(), name
        assert (t["entropy"] >= -1e-5).all() and (t["kl_to_final"] >= 0).all(), name
        top, tg = out.result.extra["top"], out.result.extra["targets"]
        merged = tg.merge(top, left_on=["site", "layer", "pos", "target_id"],
                          right_on=["site", "layer", "pos", "token_id"], suffixes=("", "_top"))
        assert len(merged) or name != "default", name  # the random tiny models rarely rank ' Paris' in the top 5
        assert ((merged["prob"] - merged["prob_top"]).abs() < 1e-5).all(), name  # fp32 dots
        assert ((merged["rank"] == merged["rank_top"])).all(), name
        parallel = "neox" in name
        assert ("resid_mid" in set(t["site"])) != parallel, name
        assert len(t) == len(out.result.meta["sites"]) * t["layer"].nunique() * out.result.meta["n_tokens"]


def test_the_default_model_forms_its_answer_in_late_layers(tmp_path):
    """On a fact the default model knows, the capital's probability at the last position rises through the
    layers and the early layers are far from the final distribution."""
    from analysis.analyses.lens.spec import LensSpec
    from analysis.runner import run
    from analysis.store import Store

    out = run(LensSpec(prompt="The capital of France is", targets=(" Paris",), sites=("resid_post",)),
              store=Store(tmp_path / "s.duckdb"))
    t = out.result.extra["targets"]
    p = t[t["pos"] == t["pos"].max()].sort_values("layer")["prob"].to_numpy()
    assert p[-1] > 0.9 and p[0] < 0.05
    kl = out.result.table.groupby("layer")["kl_to_final"].mean().to_numpy()
    assert kl[0] > 1.0 and kl[-1] < 1e-5


@pytest.mark.parametrize("fields, message", [
    ({"targets": (" Parisian stuff",)}, "not one"),
    ({"target_ids": (10**6,)}, "vocabulary"),
    ({"sites": ()}, "at least one residual site"),
    ({"prompt": "   "}, "prompt is empty"),
])
def test_bad_lens_input_gets_a_message_and_stores_nothing(tmp_path, fields, message):
    from analysis import WorkbenchError
    from analysis.analyses.lens.spec import LensSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(WorkbenchError, match=message):
        spec = LensSpec(**{"prompt": "The capital of France is", **fields})
        spec.validate()
        run(spec, store=store)
    assert store.count() == 0


def test_target_tokens_keep_their_leading_space_through_a_link():
    from analysis.analyses.lens.spec import LensSpec

    spec = LensSpec.from_dict({"prompt": "x", "targets": " Paris, Rome", "sites": "resid_pre, resid_post"})
    assert spec.targets == (" Paris", " Rome") and spec.sites == ("resid_pre", "resid_post")


def test_untrained_tuned_lens_is_the_logit_lens_and_training_beats_it(tmp_path):
    from analysis.analyses.tuned_lens.compute import TunedLensSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    untrained = run(TunedLensSpec(steps=0, max_tokens=2048), store=store).result.table
    assert (untrained["tuned_lens_kl"] - untrained["logit_lens_kl"]).abs().max() < 1e-6
    trained = run(TunedLensSpec(), store=store)
    t = trained.result.table
    L = len(t)
    assert (t["tuned_lens_kl"][: L - 1] < t["logit_lens_kl"][: L - 1]).all()
    # held-out KL on the shipped sentences held out whole (templated like the training ones): 17 -> ~0.3 nats
    assert t["tuned_lens_kl"][0] < 0.2 * t["logit_lens_kl"][0]
    assert trained.result.meta["n_eval_sentences"] > 100 and "held out whole" in trained.result.meta["held_out"]
    assert (t["tuned_lens_low"] <= t["tuned_lens_kl"]).all() and (t["tuned_lens_kl"] <= t["tuned_lens_high"]).all()


PROSE = ["The old lighthouse keeper climbed the stairs every evening to light the lamp.",
         "Rain fell softly on the roof while the children read their books by the fire.",
         "A small boat drifted across the lake, its sail catching the last of the wind.",
         "The market opened early, and the baker sold warm bread to the first customers."]


def test_tuned_lens_is_evaluated_on_sentences_it_never_trained_on(default_handle, tmp_path):
    """The held-out KL was measured on a random 10% of the tokens of the sentences it trained on; now whole
    sentences are held out (or the user's own text), and the figure is the logit lens's own KL on them."""
    from analysis.analyses.lens.spec import LensSpec
    from analysis.analyses.tuned_lens.compute import TunedLensSpec, split_sentences
    from analysis.runner import run
    from analysis.session import ModelSession
    from analysis.store import Store

    with ModelSession(default_handle) as s:
        train, held, what = split_sentences(s, TunedLensSpec())
    assert not set(map(tuple, train)) & set(map(tuple, held)) and len(held) == (len(train) + len(held)) // 10
    store = Store(tmp_path / "s.duckdb")
    out = run(TunedLensSpec(steps=50, heldout_text="\n".join(PROSE)), store=store)
    t = out.result.table
    assert out.result.meta["n_eval_sentences"] == len(PROSE) and "the user gave" in out.result.meta["held_out"]
    # the logit lens's held-out KL, independently: the lens analysis on each sentence, resid_pre of each layer
    per_sentence = []
    for line in PROSE:
        lens = run(LensSpec(prompt=line, sites=("resid_pre",)), store=store).result.table
        per_sentence.append(lens.groupby("layer")["kl_to_final"].mean().to_numpy())
    expected = sum(per_sentence) / len(PROSE)
    assert abs(t["logit_lens_kl"].to_numpy() - expected).max() < 1e-3 * max(1.0, expected.max())


def test_tuned_lens_beside_the_logit_lens_is_stored_once_per_model(tiny_dirs, tmp_path):
    from analysis.analyses.lens.spec import LensSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    first = run(LensSpec(prompt="The capital of France is", lenses=("logit", "tuned")), store=store)
    t = first.result.table
    assert set(t["lens"]) == {"logit", "tuned"}
    tuned = t[t["lens"] == "tuned"]
    assert set(tuned["site"]) == {"resid_pre", "resid_post"}  # no translator for resid_mid
    last = tuned[(tuned["site"] == "resid_post") & (tuned["layer"] == tuned["layer"].max())]
    assert last["kl_to_final"].max() < 1e-5  # the last layer needs no translation
    early = t[(t["site"] == "resid_pre") & (t["layer"] <= 2)].groupby("lens")["kl_to_final"].mean()
    assert early["tuned"] < early["logit"]
    n_tuned = len(store.runs("tuned_lens"))
    run(LensSpec(prompt="The capital of Japan is", lenses=("tuned",)), store=store)
    assert len(store.runs("tuned_lens")) == n_tuned == 1
    for folder in tiny_dirs.values():  # the three architectures
        out = run(LensSpec(model=str(folder), prompt="The capital of France is", lenses=("tuned",)), store=store)
        assert out.result.table["kl_to_final"].notna().all()


def test_lens_summary_by_layer_has_bootstrap_intervals_over_positions(tmp_path):
    from scipy import stats

    from analysis.analyses.lens.spec import LensSpec
    from analysis.runner import run
    from analysis.store import Store

    out = run(LensSpec(prompt="Then, John and Mary went to the store. John gave a ring to", sites=("resid_post",)),
              store=Store(tmp_path / "s.duckdb"))
    t, by = out.result.table, out.result.extra["by_layer"]
    assert out.spec.bos == "yes" and (by["n_positions"] == out.result.meta["n_tokens"] - 1).all()  # BOS left out
    for layer in (0, 3):
        kl = t[(t["layer"] == layer) & (t["pos"] >= 1)]["kl_to_final"].to_numpy()
        row = by[by["layer"] == layer].iloc[0]
        assert row["kl_mean"] == pytest.approx(kl.mean(), rel=1e-6)
        ref = stats.bootstrap((kl,), lambda x, axis=-1: x.mean(axis), vectorized=True, n_resamples=20_000,
                              method="percentile", random_state=0).confidence_interval
        width = ref.high - ref.low
        assert abs(row["kl_low"] - ref.low) < 0.15 * width and abs(row["kl_high"] - ref.high) < 0.15 * width


def test_tuned_lens_trains_and_reads_out_on_a_bfloat16_model(tiny_dirs, tmp_path):
    """A 1 B model is loaded in bfloat16; the tuned lens trains its translators in float32 and read out through the
    model's own norm and unembedding, which refused float32 inputs ("mat1 and mat2 must have the same dtype", seen
    on the 1 B benchmark). It now trains and reads out there: the last layer needs no translation, as in float32."""
    from analysis import load_model
    from analysis.analyses.lens.spec import LensSpec
    from analysis.analyses.tuned_lens.compute import TunedLensSpec
    from analysis.runner import run
    from analysis.store import Store

    store, folder = Store(tmp_path / "s.duckdb"), str(tiny_dirs["llama"])
    assert load_model(folder, dtype="bfloat16").summary.dtype == "bfloat16"
    trained = run(TunedLensSpec(model=folder, dtype="bfloat16", steps=20, max_tokens=512, batch_tokens=128),
                  store=store)
    assert len(trained.result.table) > 0
    out = run(LensSpec(model=folder, dtype="bfloat16", prompt="The capital of France is", lenses=("logit", "tuned")),
              store=store)
    t = out.result.table
    last = t[(t["site"] == "resid_post") & (t["layer"] == t["layer"].max())]
    assert set(last["lens"]) == {"logit", "tuned"} and last["kl_to_final"].max() < 1e-2  # bfloat16 rounding
