"""Attribution patching (AtP) and relevance patching (RelP): gradients checked against finite differences of
exact activation patching, LRP rules that leave the forward pass unchanged, and faithfulness on IOI."""
from __future__ import annotations

import json

import pytest
import torch

from analysis import load_model
from analysis.analyses.patching.spec import PatchingSpec
from analysis.runner import run
from analysis.store import Store
from analysis.tasks import ioi_pairs
from kernels.attribution import LRPRules, attribution_scores, lrp_hooks
from kernels.patching import BlockRunner, activation_patch_sweep, source_activations

ALL_RULES = LRPRules(ln=True, identity=True, half=True, attention=True)


def _ioi(n=8):
    rows = ioi_pairs(load_model("default")).rows
    rows = [r for r in rows if len(r["clean_ids"]) == len(rows[0]["clean_ids"])][:n]
    t = {k: torch.tensor([r[k] for r in rows]) for k in ("clean_ids", "corrupted_ids", "io_id", "s_id")}
    return t["clean_ids"], t["corrupted_ids"], t["io_id"], t["s_id"]


def _ld(io, s):
    def rows(logits):
        n = logits.shape[0] // io.shape[0]
        return (logits.gather(1, io.repeat(n)[:, None]) - logits.gather(1, s.repeat(n)[:, None]))[:, 0]
    return rows


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "s.duckdb")


def test_lrp_rules_leave_the_forward_pass_unchanged(tiny_handle, default_handle):
    """Unchanged up to float rounding: on RMSNorm the bridge recomputes a norm whose scale a hook edited."""
    for handle in (tiny_handle, default_handle):
        toks = torch.tensor([[0, 343, 12, 543, 270, 558, 300, 22]])
        with torch.no_grad():
            ref = handle.bridge(toks)
            with handle.bridge.hooks(fwd_hooks=lrp_hooks(handle.bridge, ALL_RULES)):
                got = handle.bridge(toks)
        assert (ref - got).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("component", ["resid_pre", "resid_mid", "attn_out", "mlp_out", "z_by_pos", "v_all_pos",
                                       "pattern_by_pos"])
def test_atp_is_the_first_order_term_of_activation_patching(default_handle, component):
    """Patch in base + eps * delta: exact patching changes the metric by eps * AtP + O(eps^2)."""
    clean, corr, io, s = _ioi(4)
    bridge, metric = default_handle.bridge, _ld(io, s)
    runner = BlockRunner(bridge, corr)
    base_src = source_activations(bridge, corr, component)
    clean_src = source_activations(bridge, clean, component)
    eps = 1e-3
    nudged = {k: base_src[k] + eps * (clean_src[k] - base_src[k]) for k in base_src}
    exact = activation_patch_sweep(runner, nudged, component, metric).values  # [..., B]
    base = metric(runner.final_logits)  # [B]
    exact_delta = (exact - base).sum(-1) / eps
    atp = attribution_scores(bridge, corr, clean_src, [component], lambda lg: metric(lg).sum())[component].sum(-1)
    scale = atp.abs().max()
    assert scale > 0.1
    assert (exact_delta - atp).abs().max() <= 0.02 * scale + 1e-3


def test_relp_without_rules_is_atp(default_handle):
    clean, corr, io, s = _ioi(4)
    bridge, metric = default_handle.bridge, _ld(io, s)
    src = source_activations(bridge, clean, "mlp_out")
    atp = attribution_scores(bridge, corr, src, ["mlp_out"], lambda lg: metric(lg).mean())
    off = attribution_scores(bridge, corr, src, ["mlp_out"], lambda lg: metric(lg).mean(), LRPRules.none())
    assert torch.equal(atp["mlp_out"], off["mlp_out"])
    on = attribution_scores(bridge, corr, src, ["mlp_out"], lambda lg: metric(lg).mean(), LRPRules())
    assert not torch.allclose(atp["mlp_out"], on["mlp_out"])  # the rules do change the backward pass


def test_ah_rule_makes_query_key_pattern_scores_unavailable(default_handle):
    clean, corr, io, s = _ioi(4)
    bridge, metric = default_handle.bridge, _ld(io, s)
    acts = ["q_all_pos", "k_all_pos", "pattern_all_pos", "z_all_pos", "v_all_pos"]
    src = {k: v for a in acts for k, v in source_activations(bridge, clean, a).items()}
    out = attribution_scores(bridge, corr, src, acts, lambda lg: metric(lg).mean(), ALL_RULES)
    for a in ("q_all_pos", "k_all_pos", "pattern_all_pos"):
        assert torch.isnan(out[a]).all(), a
    for a in ("z_all_pos", "v_all_pos"):
        assert torch.isfinite(out[a]).all() and out[a].abs().sum() > 0, a


def test_relp_is_faithful_on_the_default_models_ioi(store):
    out = run(PatchingSpec(n_pairs=16, components=("resid_pre", "attn_out", "mlp_out")), store=store)
    f = out.result.extra["faithfulness"].set_index(["method", "component"])
    for comp in ("resid_pre", "attn_out", "mlp_out"):
        assert f.loc[("relp", comp), "pearson"] >= 0.9, f
        assert f.loc[("atp", comp), "pearson"] == f.loc[("atp", comp), "pearson"]  # reported alongside
        assert 0 <= f.loc[("relp", comp), "top_k_overlap"] <= 1


def test_all_methods_run_on_three_architectures(tiny_dirs, store):
    pairs = [{"clean": "Then, John and Mary went to the store. John gave a ring to",
              "corrupted": "Then, Adam and Lucy went to the store. Nora gave a ring to",
              "answer": " Mary", "wrong": " John"}]
    for arch, folder in tiny_dirs.items():
        out = run(PatchingSpec(model=str(folder), pairs=json.dumps(pairs), metric="logit_diff",
                               components=("resid_pre", "mlp_out", "z_all_pos")), store=store)
        t = out.result.table
        assert set(t["method"]) == {"activation", "atp", "relp"}, arch
        assert t["value"].notna().all(), arch
        f = out.result.extra["faithfulness"]
        assert len(f) == 6, arch


def test_integrated_gradients_is_complete(default_handle):
    """IG's completeness: per layer, the attributions over all positions add up to the effect of patching the
    whole layer's activation (all positions at once), computed here with a plain hook."""
    from kernels.attribution import integrated_gradients

    clean, corr, io, s = _ioi(4)
    bridge, metric = default_handle.bridge, _ld(io, s)
    ig = integrated_gradients(bridge, corr, clean, ["attn_out"], metric, n_steps=64)["attn_out"]  # [layer, pos, B]
    src = source_activations(bridge, clean, "attn_out")
    with torch.no_grad():
        base = metric(bridge(corr)[:, -1])
        for layer in range(default_handle.summary.n_layers):
            name = f"blocks.{layer}.hook_attn_out"
            with bridge.hooks(fwd_hooks=[(name, lambda act, hook, v=src[name]: v.clone())]):
                patched = metric(bridge(corr)[:, -1])
            effect = patched - base  # [B]
            total = ig[layer].sum(0)  # [B]
            assert torch.allclose(total, effect, atol=0.02 * effect.abs().max().item() + 1e-3), layer


def test_integrated_gradients_through_the_pipeline(store):
    out = run(PatchingSpec(n_pairs=8, components=("z_all_pos", "mlp_out"), methods=("activation", "ig"),
                           ig_steps=16), store=store)
    f = out.result.extra["faithfulness"].set_index(["method", "component"])
    assert f.loc[("ig", "z_all_pos"), "pearson"] > 0.9 and f.loc[("ig", "mlp_out"), "pearson"] > 0.8


def test_integrated_gradients_at_resid_mid_add_up_to_the_whole_source_run(default_handle):
    """Setting resid_mid at every position of any layer to the source run's makes the rest of the network the
    source run's, so by completeness each layer's resid_mid attributions add up to metric(source) - metric(base)."""
    from kernels.attribution import integrated_gradients

    clean, corr, io, s = _ioi(4)
    bridge, metric = default_handle.bridge, _ld(io, s)
    ig = integrated_gradients(bridge, corr, clean, ["resid_mid"], metric, n_steps=64)["resid_mid"]  # [L, P, B]
    with torch.no_grad():
        effect = metric(bridge(clean)[:, -1]) - metric(bridge(corr)[:, -1])  # [B]
    assert ig.shape == (default_handle.summary.n_layers, clean.shape[1], 4)
    for layer in range(ig.shape[0]):
        assert torch.allclose(ig[layer].sum(0), effect, atol=0.02 * effect.abs().max().item()), layer
