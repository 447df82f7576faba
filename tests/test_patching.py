"""Activation patching: equal to TransformerLens 4.3's `transformer_lens.patching` on the same model and inputs."""
from __future__ import annotations

import json

import pytest
import torch
from transformer_lens import patching as tl_patching

from analysis import WorkbenchError, load_model
from analysis.analyses.patching.spec import PatchingSpec
from analysis.runner import run
from analysis.store import Store

TL = {
    "resid_pre": tl_patching.get_act_patch_resid_pre,
    "resid_mid": tl_patching.get_act_patch_resid_mid,
    "attn_out": tl_patching.get_act_patch_attn_out,
    "mlp_out": tl_patching.get_act_patch_mlp_out,
    "z_all_pos": tl_patching.get_act_patch_attn_head_out_all_pos,
    "z_by_pos": tl_patching.get_act_patch_attn_head_out_by_pos,
    "q_all_pos": tl_patching.get_act_patch_attn_head_q_all_pos,
    "k_by_pos": tl_patching.get_act_patch_attn_head_k_by_pos,
    "v_all_pos": tl_patching.get_act_patch_attn_head_v_all_pos,
    "pattern_all_pos": tl_patching.get_act_patch_attn_head_pattern_all_pos,
    "pattern_by_pos": tl_patching.get_act_patch_attn_head_pattern_by_pos,
}


# two IOI-style pairs as text, tokenised by each model's own tokenizer
TEXT_PAIRS = [{"clean": "Then, John and Mary went to the store. John gave a ring to",
               "corrupted": "Then, Adam and Lucy went to the store. Nora gave a ring to",
               "answer": " Mary", "wrong": " John"},
              {"clean": "Then, Emma and Frank went to the park. Emma gave a ball to",
               "corrupted": "Then, Oscar and Julia went to the park. Henry gave a ball to",
               "answer": " Frank", "wrong": " Emma"}]


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "s.duckdb")


def _grid(table, component, shape_axes):
    sub = table[(table["component"] == component) & (table["method"] == "activation")].sort_values(list(shape_axes))
    sizes = [sub[a].max() + 1 for a in shape_axes]
    return torch.tensor(sub["value"].to_numpy(), dtype=torch.float32).reshape(*[int(s) for s in sizes])


AXES = {"resid_pre": ("layer", "pos"), "resid_mid": ("layer", "pos"), "attn_out": ("layer", "pos"),
        "mlp_out": ("layer", "pos"), "z_all_pos": ("layer", "head"), "z_by_pos": ("layer", "pos", "head"),
        "q_all_pos": ("layer", "head"), "k_by_pos": ("layer", "pos", "head"), "v_all_pos": ("layer", "head"),
        "pattern_all_pos": ("layer", "head"), "pattern_by_pos": ("layer", "head", "dest_pos")}


def _tl_reference(handle, pairs, component, direction, metric_name):
    clean = torch.tensor([p["clean_ids"] for p in pairs])
    corr = torch.tensor([p["corrupted_ids"] for p in pairs])
    ans = torch.tensor([p["answer_id"] for p in pairs])
    wrong = torch.tensor([p["wrong_id"] for p in pairs])
    base, source = (corr, clean) if direction == "denoise" else (clean, corr)
    bridge = handle.bridge
    with torch.no_grad():
        clean_logp = bridge(clean)[:, -1].log_softmax(-1)
        _, source_cache = bridge.run_with_cache(source)

    def metric(logits):
        last = logits[:, -1]
        if metric_name == "logit_diff":
            return (last.gather(1, ans[:, None]) - last.gather(1, wrong[:, None])).mean()
        logp = last.log_softmax(-1)
        if metric_name == "answer_prob":
            return logp.gather(1, ans[:, None]).exp().mean()
        return (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean()

    with torch.no_grad():
        return TL[component](bridge, base, source_cache, metric)


@pytest.mark.parametrize("component", list(TL))
def test_equals_transformer_lens_on_the_default_model(store, component):
    out = run(PatchingSpec(n_pairs=6, components=(component,), metric="logit_diff", methods=("activation",)), store=store)
    pairs = json.loads(out.spec.pairs)
    ours = _grid(out.result.table, component, AXES[component])
    ref = _tl_reference(load_model("default"), pairs, component, "denoise", "logit_diff")
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("metric", ["answer_prob", "kl"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_directions_and_metrics_equal_transformer_lens(store, metric, direction):
    out = run(PatchingSpec(n_pairs=4, components=("resid_pre", "z_all_pos"), metric=metric, direction=direction,
                           methods=("activation",)),
              store=store)
    pairs = json.loads(out.spec.pairs)
    for comp in ("resid_pre", "z_all_pos"):
        ref = _tl_reference(load_model("default"), pairs, comp, direction, metric)
        assert (_grid(out.result.table, comp, AXES[comp]) - ref).abs().max().item() <= 1e-4


def test_normalised_logit_difference(store):
    raw = run(PatchingSpec(n_pairs=8, components=("resid_pre",), metric="logit_diff", methods=("activation",)),
              store=store)
    norm = run(PatchingSpec(n_pairs=8, components=("resid_pre",), methods=("activation",)), store=store)
    m = norm.result.meta
    assert m["clean_metric"] > 2 > m["corrupted_metric"]
    expect = (raw.result.table["value"] - m["corrupted_metric"]) / (m["clean_metric"] - m["corrupted_metric"])
    assert torch.allclose(torch.tensor(norm.result.table["value"].to_numpy()), torch.tensor(expect.to_numpy()),
                          atol=1e-5)
    # analytic anchors: the final residual at the final position carries the whole clean answer (1), and at
    # layer 0 a position whose token is the same in both prompts changes nothing (0)
    post = run(PatchingSpec(n_pairs=8, components=("resid_post", "resid_pre"), methods=("activation",)),
               store=store).result.table
    last = post[(post["component"] == "resid_post") & (post["layer"] == post["layer"].max())]
    assert last.sort_values("pos")["value"].iloc[-1] == pytest.approx(1.0, abs=1e-4)
    pairs = json.loads(norm.spec.pairs)
    same = [i for i in range(len(pairs[0]["clean_ids"]))
            if all(p["clean_ids"][i] == p["corrupted_ids"][i] for p in pairs)]
    layer0 = post[(post["component"] == "resid_pre") & (post["layer"] == 0)].set_index("pos")["value"]
    assert same and all(abs(layer0[i]) < 1e-6 for i in same)
    assert max(abs(layer0[i]) for i in layer0.index if i not in same) > 0.05


@pytest.mark.parametrize("component", ["resid_pre", "attn_out", "mlp_out", "z_by_pos", "k_all_pos", "v_by_pos",
                                       "pattern_all_pos", "pattern_by_pos"])
def test_equals_transformer_lens_on_three_architectures(tiny_dirs, store, component):
    if component not in TL:
        TL[component] = getattr(tl_patching, {"k_all_pos": "get_act_patch_attn_head_k_all_pos",
                                              "v_by_pos": "get_act_patch_attn_head_v_by_pos"}[component])
        AXES[component] = {"k_all_pos": ("layer", "head"), "v_by_pos": ("layer", "pos", "head")}[component]
    pairs = TEXT_PAIRS
    for arch, folder in tiny_dirs.items():
        out = run(PatchingSpec(model=str(folder), pairs=json.dumps(pairs), components=(component,),
                               metric="logit_diff", methods=("activation",)), store=store)
        ref = _tl_reference(load_model(str(folder)), json.loads(out.spec.pairs), component, "denoise", "logit_diff")
        ours = _grid(out.result.table, component, AXES[component])
        assert ours.shape == ref.shape, arch
        assert (ours - ref).abs().max().item() <= 1e-4, arch


@pytest.mark.parametrize("pairs, message", [
    ([{"clean": "The capital of France is", "corrupted": "The capital of the big France is", "answer": " Paris",
       "wrong": " Rome"}], "patching needs equal lengths"),
    ([{"clean": "The capital of France is", "corrupted": "The capital of Japan is", "answer": " Parisian stuff",
       "wrong": " Rome"}], "not one"),
    ([{"clean": "The capital of France is", "corrupted": "The capital of Japan is", "answer": " Paris",
       "wrong": " Paris"}], "the same token"),
    ([{"clean": "The capital of France is", "corrupted": "The capital of Japan is", "wrong": " Rome"}],
     "give 'answer'"),
    ([{"clean_ids": [0, 1, 99999], "corrupted_ids": [0, 1, 2], "answer_id": 5, "wrong_id": 6}], "vocabulary"),
])
def test_bad_pairs_get_a_clear_message_and_store_nothing(store, pairs, message):
    with pytest.raises(WorkbenchError, match=message):
        run(PatchingSpec(pairs=json.dumps(pairs)), store=store)
    assert store.count("runs") == 0


MIXED = [*TEXT_PAIRS,
         {"clean": "The capital of France is", "corrupted": "The capital of Japan is", "answer": " Paris",
          "wrong": " Tokyo"},
         {"clean": "In France, the capital city is", "corrupted": "In Japan, the capital city is",
          "answer": " Paris", "wrong": " Tokyo"},
         {"clean": "The capital of Italy is", "corrupted": "The capital of Spain is", "answer": " Rome",
          "wrong": " Madrid"}]


@pytest.mark.parametrize("metric", ["logit_diff", "logit_diff_normalized"])
@pytest.mark.parametrize("component", ["resid_pre", "z_all_pos", "pattern_by_pos"])
def test_pairs_of_different_lengths_run_in_groups(store, metric, component):
    """Pairs of three token lengths run as three batches; the result is TransformerLens's patching on each
    length, weighted by its pairs, positions aligned at the final token (a position a shorter pair lacks is
    unpatched for it), normalised once with the mean clean and corrupted metric over all pairs."""
    handle = load_model("default")
    spec = PatchingSpec(pairs=json.dumps(MIXED), components=(component,), methods=("activation",), metric=metric)
    out = run(spec, store=store)
    pairs = json.loads(out.spec.pairs)
    lengths = [len(p["clean_ids"]) for p in pairs]
    assert len(set(lengths)) == 3 and out.result.meta["length_groups"] == {
        str(n): lengths.count(n) for n in dict.fromkeys(lengths)}
    n_tokens = max(lengths)
    total = base = source = 0
    for n in set(lengths):
        group = [p for p in pairs if len(p["clean_ids"]) == n]
        ref = _tl_reference(handle, group, component, "denoise", "logit_diff")
        b, s = _mean_logit_diffs(handle, group)
        for dim, axis in enumerate(AXES[component]):
            if axis in ("pos", "dest_pos") and n < n_tokens:
                shape = list(ref.shape)
                shape[dim] = n_tokens - n
                ref = torch.cat([torch.full(shape, b), ref], dim)
        w = len(group) / len(pairs)
        total, base, source = total + w * ref, base + w * b, source + w * s
    if metric == "logit_diff_normalized":
        total = (total - base) / (source - base)
    got = _grid(out.result.table, component, AXES[component])
    torch.testing.assert_close(got, total.float(), atol=1e-4, rtol=1e-4)
    assert out.result.meta["base_metric"] == pytest.approx(base, abs=1e-4)
    assert len(out.result.extra["tokens"]) == n_tokens


@pytest.mark.parametrize("metric", ["logit_diff", "logit_diff_normalized"])
def test_per_pair_values_bootstrap_intervals_and_permutation_test(store, metric):
    """Each pair's value is TransformerLens's patching of that pair alone; the value is their mean; the 95%
    interval agrees with scipy's bootstrap of the same statistic (the normalisation recomputed in each resample)
    and the p-value with scipy's exact sign-flip permutation test against each pair's unpatched run."""
    from scipy import stats

    handle = load_model("default")
    spec = PatchingSpec(pairs=json.dumps(MIXED), components=("resid_pre", "z_all_pos"),
                        methods=("activation", "atp"), metric=metric)
    out = run(spec, store=store)
    pairs, table, per = json.loads(out.spec.pairs), out.result.table, out.result.extra["per_pair"]
    n, n_tokens = len(pairs), max(len(p["clean_ids"]) for p in pairs)
    lds = [_mean_logit_diffs(handle, [p]) for p in pairs]  # (base, source) of each pair
    base = torch.tensor([b for b, _ in lds], dtype=torch.float64)
    source = torch.tensor([s for _, s in lds], dtype=torch.float64)
    base_m, source_m = base.mean().item(), source.mean().item()

    def scale(v):
        return (v - base_m) / (source_m - base_m) if metric == "logit_diff_normalized" else v

    raw = {}
    for i, p in enumerate(pairs):
        ref = _tl_reference(handle, [p], "resid_pre", "denoise", "logit_diff").double()  # [layer, pos of the pair]
        ref = torch.cat([torch.full((ref.shape[0], n_tokens - ref.shape[1]), base[i].item()), ref], 1)
        raw[i] = ref
        sub = per[(per["method"] == "activation") & (per["component"] == "resid_pre") & (per["pair"] == i)]
        got = torch.tensor(sub.sort_values(["layer", "pos"])["value"].to_numpy(), dtype=torch.float64)
        torch.testing.assert_close(got.reshape(ref.shape), scale(ref), atol=2e-4, rtol=1e-4)
    key = ["method", "component", "layer", "pos", "head", "dest_pos"]
    means = per.groupby(key, dropna=False)["value"].mean().reset_index().merge(table, on=key)
    assert len(means) == len(table) and (means["value_x"] - means["value_y"]).abs().max() < 1e-4
    assert (table["ci_low"] <= table["value"] + 1e-6).all() and (table["value"] <= table["ci_high"] + 1e-6).all()
    assert table.loc[table["method"] == "atp", "p_value"].isna().all()

    act = table[(table["method"] == "activation") & (table["component"] == "resid_pre")].set_index(["layer", "pos"])
    for layer, pos in [(0, n_tokens - 1), (3, n_tokens - 3), (5, n_tokens - 1)]:
        patched = torch.stack([raw[i][layer, pos] for i in range(n)]).numpy()
        if metric == "logit_diff_normalized":
            def stat(x, b, s, axis=-1):
                return (x.mean(axis) - b.mean(axis)) / (s.mean(axis) - b.mean(axis))
            data = (patched, base.numpy(), source.numpy())
        else:
            def stat(x, axis=-1):
                return x.mean(axis)
            data = (patched,)
        ref_ci = stats.bootstrap(data, stat, paired=True, vectorized=True, n_resamples=20_000, method="percentile",
                                 random_state=1).confidence_interval
        row = act.loc[(layer, pos)]
        width = max(ref_ci.high - ref_ci.low, 1e-3)
        assert abs(row["ci_low"] - ref_ci.low) < 0.15 * width and abs(row["ci_high"] - ref_ci.high) < 0.15 * width
        perm = stats.permutation_test((patched - base.numpy(),), lambda d, axis=-1: d.mean(axis),
                                      permutation_type="samples", n_resamples=10_000, vectorized=True,
                                      alternative="two-sided")
        assert row["p_value"] == pytest.approx(perm.pvalue, abs=1e-9)


def _mean_logit_diffs(handle, pairs) -> tuple[float, float]:
    """Mean logit difference on the corrupted (base) and clean (source) prompts, by a plain forward."""
    def ld(key):
        with torch.no_grad():
            last = handle.bridge(torch.tensor([p[key] for p in pairs]))[:, -1]
        return sum((last[i, p["answer_id"]] - last[i, p["wrong_id"]]).item() for i, p in enumerate(pairs)) / len(pairs)
    return ld("corrupted_ids"), ld("clean_ids")


def test_bad_specs():
    with pytest.raises(WorkbenchError, match="must be one of"):
        PatchingSpec.from_dict({"components": "resid_pre,blocks.0.evil"})
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        PatchingSpec.from_dict({"pairs": "[{"})
    with pytest.raises(WorkbenchError, match="at most 256"):
        PatchingSpec.from_dict({"n_pairs": "1000"})


def test_plan_chunks_is_optimal_and_covers_every_patch():
    """The chunk planner against a brute force over every way of cutting the sorted patches into runs."""
    import itertools
    import random

    from kernels.patching import plan_chunks

    rng = random.Random(0)
    for trial in range(60):
        n_pos, B, cap = rng.randint(2, 6), rng.randint(1, 4), rng.randint(1, 5)
        overhead = rng.choice([0.0, 5.0, 40.0, 500.0])
        items = [(p, (p, h)) for p in sorted(rng.sample(range(n_pos), rng.randint(1, n_pos)))
                 for h in range(rng.randint(1, 2))]
        chunks = plan_chunks(items, B, cap, n_pos, overhead)
        assert [ix for _, c in chunks for ix in c] == [ix for _, ix in items]
        assert all(1 <= len(c) <= cap and p0 == min(ix[0] for ix in c) for p0, c in chunks)

        def cost(chs):
            return sum(overhead + len(c) * B * (n_pos - p0) for p0, c in chs)

        best = float("inf")
        for cuts in itertools.product([0, 1], repeat=len(items) - 1):
            runs, cur = [], [items[0][1]]
            for (_, ix), c in zip(items[1:], cuts):
                if c:
                    runs.append(cur)
                    cur = []
                cur.append(ix)
            runs.append(cur)
            if all(len(r) <= cap for r in runs):
                best = min(best, cost([(r[0][0], r) for r in runs]))
        assert cost(chunks) == pytest.approx(best), trial


@pytest.mark.parametrize("component", ["resid_pre", "resid_post", "z_all_pos", "q_by_pos", "k_by_pos",
                                       "pattern_all_pos", "pattern_by_pos"])
def test_suffix_runs_equal_full_runs(default_handle, tiny_dirs, component):
    """Patches that run positions p0.. over the base run's cached keys/values give what full-length runs give,
    on the default model and the three architectures, whichever way the patches are grouped into forwards."""
    from kernels.patching import BlockRunner, activation_patch_sweep, source_activations

    for handle in [default_handle] + [load_model(str(f)) for f in tiny_dirs.values()]:
        torch.manual_seed(0)
        vocab = min(handle.bridge.cfg.d_vocab, 1000)
        clean = torch.randint(0, vocab, (3, 9))
        corr = clean.clone()
        corr[:, 3] = torch.randint(0, vocab, (3,))
        corr[:, 6] = torch.randint(0, vocab, (3,))
        runner = BlockRunner(handle.bridge, corr)
        assert runner.suffix_ok, handle.name
        src = source_activations(handle.bridge, clean, component)

        def metric(logits):
            return logits[:, 7] - logits[:, 11]

        full = activation_patch_sweep(runner, src, component, metric, suffix=False, source_tokens=clean).values
        for chunk_rows in (3, 12, 10_000):
            fast = activation_patch_sweep(runner, src, component, metric, chunk_rows=chunk_rows,
                                          source_tokens=clean).values
            assert (fast - full).abs().max().item() < 1e-4, (handle.name, chunk_rows)
        assert full.std() > 1e-3  # the patches do something


def _hf_resid_mid_reference(folder, clean, corr, answer, wrong):
    """Brute force with plain transformers (no bridge, no kernels): for every (layer, pos), run the corrupted
    prompt with the attention block's output at that position replaced so that the residual stream after
    attention equals the clean run's there. Returns the mean logit difference [layer, pos]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    attn = [blk.attn if hasattr(blk, "attn") else blk.self_attn for blk in layers]

    def run_capture(tokens):
        outs = {}
        hs = [a.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o[0].detach()))
              for k, a in enumerate(attn)]
        try:
            res = model(tokens, output_hidden_states=True)
        finally:
            for h in hs:
                h.remove()
        return res.hidden_states, outs

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])).mean()

    with torch.no_grad():
        clean_h, clean_attn = run_capture(clean)
        corr_h, _ = run_capture(corr)
        out = torch.zeros(len(layers), clean.shape[1])
        for layer in range(len(layers)):
            clean_mid = clean_h[layer] + clean_attn[layer]  # hidden_states[l] enters block l
            for pos in range(clean.shape[1]):
                def hook(m, i, o, pos=pos, layer=layer):
                    a = o[0].clone()
                    a[:, pos] = clean_mid[:, pos] - corr_h[layer][:, pos]
                    return (a,) + tuple(o[1:])

                h = attn[layer].register_forward_hook(hook)
                try:
                    out[layer, pos] = metric(model(corr).logits)
                finally:
                    h.remove()
    return out


def test_resid_mid_is_the_true_residual_stream_between_attention_and_mlp(tiny_dirs, store):
    """resid_mid against a brute-force loop in plain transformers, on the default model (GPT-2) and the tiny
    GPT-2 and Llama models; refused with a clear message on the parallel-block NeoX model."""
    from analysis.models import DEFAULT_MODEL_DIR

    pairs = TEXT_PAIRS
    for name, folder in [("default", DEFAULT_MODEL_DIR), ("gpt2", tiny_dirs["gpt2"]), ("llama", tiny_dirs["llama"])]:
        out = run(PatchingSpec(model="default" if name == "default" else str(folder), pairs=json.dumps(pairs),
                               components=("resid_mid",), metric="logit_diff", methods=("activation",)), store=store)
        got = json.loads(out.spec.pairs)
        t = lambda k: torch.tensor([p[k] for p in got])  # noqa: E731
        ref = _hf_resid_mid_reference(folder, t("clean_ids"), t("corrupted_ids"), t("answer_id"), t("wrong_id"))
        ours = _grid(out.result.table, "resid_mid", ("layer", "pos"))
        assert (ours - ref).abs().max().item() <= 1e-4, name
        assert ref.std() > 1e-3, name
        # TransformerLens's own resid_mid sweep agrees (a hook on the bridge's hook_resid_mid alone would not:
        # it is ln2's input, and the edit never reaches the residual stream)
        tl = _tl_reference(load_model("default" if name == "default" else str(folder)), got, "resid_mid",
                           "denoise", "logit_diff")
        assert (tl - ours).abs().max().item() <= 1e-4, name
    n = store.count()
    with pytest.raises(WorkbenchError, match="resid_mid does not exist"):
        run(PatchingSpec(model=str(tiny_dirs["neox"]), pairs=json.dumps(pairs), components=("resid_mid",)),
            store=store)
    assert store.count() == n
