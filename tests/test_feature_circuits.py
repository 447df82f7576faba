"""Feature circuits (kernels/feature_circuits.py, the `circuit` analysis at level "features") against independent
references: the plain transformers model under the bridge with hooks on its blocks' outputs (one forward per node
patched, autograd for the gradients and the edges' Jacobians, the mean ablation layer by layer), integrated
gradients' completeness, and the exact identities of the splice (every node kept is the clean run)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_circuits import _HF, _logit_diff, _pairs

from kernels.feature_circuits import (
    FeatureStack,
    changes,
    edges_into,
    evaluate,
    integrated_level_gradients,
    level_gradients,
    level_means,
    patch_nodes,
    record,
)
from kernels.sae import SparseAutoencoder


def _random_sae(d: int, width: int = 48, k: int = 6, seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, width, "topk", k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, width, generator=g) * 0.3)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(width, d, generator=g), dim=1))
        sae.b_enc.copy_(torch.randn(width, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae.requires_grad_(False)


class _Blocks:
    """The transformers model itself with edits on its blocks' outputs, its attention and MLP outputs (the output
projection's and the MLP's output, before the residual add) and the first block's input."""

    def __init__(self, handle):
        self.hf = _HF(handle)

    def run(self, tokens, edit_input=None, edits=None, grad=False):
        edits = edits or {}
        handles = []
        if edit_input is not None:
            def pre(m, a, k):
                if a:
                    return (edit_input(a[0]),) + a[1:], k
                return a, {**k, "hidden_states": edit_input(k["hidden_states"])}
            handles.append(self.hf.layers[0].register_forward_pre_hook(pre, with_kwargs=True))
        for where, fn in edits.items():  # a block's output, or ("attn_out" | "mlp_out", block): a sublayer's
            def post(m, a, o, fn=fn):
                if isinstance(o, tuple):
                    return (fn(o[0]),) + tuple(o[1:])
                return fn(o)
            if isinstance(where, tuple):
                kind, layer = where
                module = self.hf.parts[layer][2] if kind == "attn_out" else self.hf.parts[layer][4]
            else:
                module = self.hf.layers[where]
            handles.append(module.register_forward_hook(post))
        try:
            with torch.set_grad_enabled(grad):
                return self.hf.model(tokens).logits[:, -1]
        finally:
            for h in handles:
                h.remove()


def _autograd_at(ref, tokens, metric, where: list, with_input: bool = False) -> dict:
    """d(sum of the metric)/d(each edited output) on the transformers model ("in": the first block's input)."""
    seen = {}

    def keep(name):
        def fn(x):
            x.retain_grad()
            seen[name] = x
            return x
        return fn
    m = metric(ref.run(tokens, edit_input=keep("in") if with_input else None, edits={w: keep(w) for w in where},
                       grad=True))
    m.sum().backward()
    return {k: v.grad for k, v in seen.items()}


@pytest.fixture(scope="module")
def split_default(default_handle):
    """The shipped model with random SAEs after blocks 1, 3 and 5, on three IOI pairs (corrupted = base)."""
    d = default_handle.bridge.cfg.d_model
    stack = FeatureStack({layer: _random_sae(d, seed=layer) for layer in (1, 3, 5)}, default_handle.bridge.cfg.n_layers)
    clean, corr, ans, wrong = _pairs(default_handle, 3)
    metric = _logit_diff(ans, wrong)
    base, src = record(default_handle.bridge, stack, corr), record(default_handle.bridge, stack, clean)
    return stack, clean, corr, metric, base, src, changes(stack, base, src)


def _moved(stack, delta, k, n_pos, limit=4):
    """A few node indices of level k whose value changes in the first pair, and the last position's error node."""
    if k == 0:
        return (delta[0][0] != 0).any(-1).nonzero().squeeze(1)[:limit]
    d_acts, d_err = delta[k]
    feats = (d_acts[0] != 0).flatten().nonzero().squeeze(1)[:limit]
    return torch.cat([feats, torch.tensor([n_pos * stack.width(k) + n_pos - 1])])


@pytest.mark.parametrize("which", ["default", "llama", "neox"])
def test_node_patching_equals_a_brute_force_on_the_transformers_model(which, default_handle, tiny_dirs):
    from analysis import load_model

    handle = default_handle if which == "default" else load_model(str(tiny_dirs[which]))
    bridge = handle.bridge
    L, d = bridge.cfg.n_layers, bridge.cfg.d_model
    layers = sorted({0, L - 1} | ({1} if L > 2 else set()))
    stack = FeatureStack({layer: _random_sae(d, seed=layer) for layer in layers}, L)
    clean, corr, ans, wrong = _pairs(handle, 3)
    metric = _logit_diff(ans, wrong)
    base, src = record(bridge, stack, corr), record(bridge, stack, clean)
    delta = changes(stack, base, src)
    ref = _Blocks(handle)
    assert torch.allclose(metric(base.runner.logits(base.final)), metric(ref.run(corr)), atol=1e-4)
    P = clean.shape[1]
    checked = sum(_patching_as_the_transformers_model(bridge, ref, stack, base, delta, corr, metric, k, P)
                  for k in range(stack.n_levels))
    assert checked >= 3 * stack.n_levels


def _patching_as_the_transformers_model(bridge, ref, stack, base, delta, tokens, metric, k, P) -> int:
    """patch_nodes on a few nodes of site k that change, each against one forward of the transformers model with
    that node's change added to its site's value at its position; the number of nodes checked."""
    nodes = _moved(stack, delta, k, P)
    ours = patch_nodes(bridge, stack, base, delta, k, nodes, metric)
    pos, vec = stack.node_vectors(k, delta[k], nodes, P)
    for j in range(len(nodes)):
        def add(x, j=j):
            x = x.clone()
            x[:, pos[j]] += vec[j].to(x.dtype)
            return x
        if k == 0:
            want = metric(ref.run(tokens, edit_input=add))
        else:
            want = metric(ref.run(tokens, edits={_site_edit(stack, k): add}))
        assert torch.allclose(ours[j], want, atol=1e-4), (stack.sites[k], j, ours[j], want)
    return len(nodes)


def test_node_gradients_and_edges_equal_autograd_on_the_transformers_model(split_default, default_handle):
    stack, clean, corr, metric, base, src, delta = split_default
    bridge = default_handle.bridge
    ref = _Blocks(default_handle)
    P = corr.shape[1]
    grads = level_gradients(bridge, stack, base, metric)
    # autograd on the transformers model: the first block's input and each SAE layer's block output
    seen = _autograd_at(ref, corr, metric, list(stack.layers), with_input=True)
    assert torch.allclose(grads[0], seen["in"], atol=1e-4)
    for k, layer in enumerate(stack.layers, 1):
        assert torch.allclose(grads[k], seen[layer], atol=1e-5)

    # edges into level 2 (after block 3) from level 1 (after block 1): the Jacobian by autograd through the
    # transformers model's blocks 2 and 3, the level-1 residual a leaf
    k = 2
    targets, sources = _moved(stack, delta, k, P), _moved(stack, delta, k - 1, P, limit=6)
    ours = edges_into(bridge, stack, base, delta, k, grads[k], targets, sources)
    s_pos, s_vec = stack.node_vectors(k - 1, delta[k - 1], sources, P)
    W, sae = stack.width(k), stack.saes[k - 1]
    for j, t in enumerate(targets.tolist()):
        x = base.resid[k - 1].clone().requires_grad_(True)
        out = {}
        ref.run(corr, edits={stack.layers[k - 2]: lambda _: x, stack.layers[k - 1]: lambda y: out.setdefault("y", y)},
                grad=True)
        acts = sae.encode(out["y"])
        acts = torch.cat([torch.zeros_like(acts[:, :1]), acts[:, 1:]], 1)
        if t < P * W:
            p, f = divmod(t, W)
            value = acts[:, p, f] * (grads[k][:, p] @ sae.W_dec[f])
        else:
            p = t - P * W
            value = ((out["y"] - sae.decode(acts))[:, p] * grads[k][:, p]).sum(-1)
        (gx,) = torch.autograd.grad(value.sum(), x)
        want = torch.einsum("bsd,sbd->sb", gx[:, s_pos], s_vec)
        assert torch.allclose(ours[:, j], want, atol=1e-5), (j, ours[:, j], want)
    assert (ours != 0).any()


def test_integrated_gradients_add_up_to_the_change_at_every_level(split_default, default_handle):
    """IG's completeness: at each level, the node scores sum to m(source residual there) - m(base run), every
    node of the level counted (features, errors; the input's positions)."""
    stack, clean, corr, metric, base, src, delta = split_default
    grads = integrated_level_gradients(default_handle.bridge, stack, base, src, metric, 32)
    change = metric(src.runner.logits(src.final)) - metric(base.runner.logits(base.final))
    for k in range(stack.n_levels):
        total = stack.scores(k, delta[k], grads[k]).sum(1)
        assert torch.allclose(total, change, rtol=2e-3, atol=2e-2), (k, total, change)


def test_mean_ablation_equals_a_brute_force_and_keeping_every_node_is_the_clean_run(split_default, default_handle):
    stack, clean, corr, metric, base, src, delta = split_default
    bridge = default_handle.bridge
    ref = _Blocks(default_handle)
    P = clean.shape[1]
    runs = record(bridge, stack, clean)
    K = stack.n_levels
    none = [torch.zeros(0, dtype=torch.long)] * K
    g = torch.Generator().manual_seed(0)
    some = [torch.randperm(stack.n_nodes(k, P), generator=g)[:stack.n_nodes(k, P) // 3] for k in range(K)]
    for means in (level_means(stack, runs), base.parts):  # the clean runs' means; the corrupted run, pair by pair
        got = evaluate(bridge, stack, runs, means, [(none, False), (none, True), (some, False), (some, True)],
                       metric)
        assert torch.allclose(got[1], metric(runs.runner.logits(runs.final)), atol=1e-4)  # every node kept
        for i, (keep, complement) in enumerate([(none, False), (some, False), (some, True)]):
            masks = []
            for k in range(K):
                m = torch.zeros(stack.n_nodes(k, P), dtype=torch.bool)
                m[keep[k]] = True
                masks.append(~m if complement else m)

            def ablate_input(x, m=masks[0], means=means):
                return torch.where(m[:, None], x, means[0])
            edits = {}
            for k, layer in enumerate(stack.layers, 1):
                W = stack.width(k)

                def ablate(y, k=k, m=masks[k], W=W, means=means):
                    acts, err = stack.split(k, y)
                    acts = torch.where(m[:P * W].view(P, W), acts, means[k][0])
                    err = torch.where(m[P * W:].view(P, 1), err, means[k][1])
                    return stack.join(k, acts, err)
                edits[layer] = ablate
            want = metric(ref.run(clean, edit_input=ablate_input, edits=edits))
            assert torch.allclose(got[[0, 2, 3][i]], want, atol=1e-4), (i, got, want)


# ----------------------------------------------------------------------------------------------------------
# SAEs at attention and MLP outputs too (Marks et al.'s full graph)
# ----------------------------------------------------------------------------------------------------------
SUBLAYER_SITES = (("attn_out", 1), ("mlp_out", 1), ("attn_out", 2), ("mlp_out", 3), ("attn_out", 3))


@pytest.fixture(scope="module")
def split_sublayers(default_handle):
    """The shipped model with random SAEs after blocks 1, 3 and 5 and at five attention and MLP outputs (block 2's
    attention has no residual SAE after its own block: its segment runs from block 1's residual to block 3's)."""
    d, L = default_handle.bridge.cfg.d_model, default_handle.bridge.cfg.n_layers
    stack = FeatureStack({layer: _random_sae(d, seed=layer) for layer in (1, 3, 5)}, L,
                         sublayer_saes={site: _random_sae(d, seed=10 + i) for i, site in enumerate(SUBLAYER_SITES)})
    clean, corr, ans, wrong = _pairs(default_handle, 3)
    metric = _logit_diff(ans, wrong)
    base, src = record(default_handle.bridge, stack, corr), record(default_handle.bridge, stack, clean)
    return stack, clean, corr, metric, base, src, changes(stack, base, src)


def _site_edit(stack, k):
    """The reference's edit key of site k >= 1: a block's output or a sublayer's."""
    kind, layer = stack.sites[k]
    return layer if kind == "resid_post" else (kind, layer)


def test_sublayer_sites_sit_in_order_and_record_what_the_transformers_model_computes(split_sublayers,
                                                                                      default_handle):
    stack, clean, corr, metric, base, src, delta = split_sublayers
    assert stack.sites == [("input", -1), ("attn_out", 1), ("mlp_out", 1), ("resid_post", 1), ("attn_out", 2),
                           ("attn_out", 3), ("mlp_out", 3), ("resid_post", 3), ("resid_post", 5)]
    assert stack.upstream(7) == [3, 4, 5, 6] and stack.upstream(6) == [3, 4, 5] and stack.upstream(1) == [0]
    assert stack.upstream(8) == [7]
    ref = _Blocks(default_handle)
    seen = {}
    ref.run(corr, edits={_site_edit(stack, k): (lambda y, k=k: seen.setdefault(k, y)) for k in range(1, 9)})
    for k in range(1, 9):
        assert torch.allclose(base.resid[k], seen[k], atol=1e-4), stack.sites[k]
    assert torch.allclose(metric(base.runner.logits(base.final)), metric(ref.run(corr)), atol=1e-4)
    with pytest.raises(ValueError, match="no residual SAE at or after its block"):
        FeatureStack({1: _random_sae(8)}, 6, sublayer_saes={("mlp_out", 2): _random_sae(8)})


def test_sublayer_nodes_patch_and_take_gradients_as_the_transformers_model_does(split_sublayers, default_handle):
    stack, clean, corr, metric, base, src, delta = split_sublayers
    bridge = default_handle.bridge
    ref = _Blocks(default_handle)
    P = clean.shape[1]
    for k in (1, 2, 4, 6):  # sublayer sites, one at the start of its segment's second block
        assert _patching_as_the_transformers_model(bridge, ref, stack, base, delta, corr, metric, k, P) >= 2
    grads = level_gradients(bridge, stack, base, metric)
    seen = _autograd_at(ref, corr, metric, [_site_edit(stack, k) for k in range(1, 9)])
    for k in range(1, 9):
        assert torch.allclose(grads[k], seen[_site_edit(stack, k)], atol=1e-5), stack.sites[k]


def test_sublayer_edges_hold_the_other_sites_and_equal_autograd_on_the_transformers_model(split_sublayers,
                                                                                           default_handle):
    """Edges into block 3's residual from block 1's residual and the three sublayer sites between (and into block
    3's MLP output from the three before it): autograd through the transformers model with every upstream site's
    value a leaf (so a path through another site is held), times each source's change."""
    stack, clean, corr, metric, base, src, delta = split_sublayers
    bridge = default_handle.bridge
    ref = _Blocks(default_handle)
    P = corr.shape[1]
    grads = level_gradients(bridge, stack, base, metric)
    for k in (7, 6):
        targets = _moved(stack, delta, k, P)
        sources = {j: _moved(stack, delta, j, P, limit=5) for j in stack.upstream(k)}
        ours = edges_into(bridge, stack, base, delta, k, grads[k], targets, sources)
        W, sae = stack.width(k), stack.saes[k - 1]
        assert set(ours) == set(stack.upstream(k))
        for i, t in enumerate(targets.tolist()):
            leaves = {j: base.resid[j].clone().requires_grad_(True) for j in stack.upstream(k)}
            out = {}
            edits = {_site_edit(stack, j): (lambda _, j=j: leaves[j]) for j in stack.upstream(k)}
            edits[_site_edit(stack, k)] = lambda y: out.setdefault("y", y)
            ref.run(corr, edits=edits, grad=True)
            acts, err = stack.split(k, out["y"])
            if t < P * W:
                p, f = divmod(t, W)
                value = acts[:, p, f] * (grads[k][:, p] @ sae.W_dec[f])
            else:
                p = t - P * W
                value = (err[:, p] * grads[k][:, p]).sum(-1)
            gs = torch.autograd.grad(value.sum(), [leaves[j] for j in stack.upstream(k)], allow_unused=True)
            for j, gx in zip(stack.upstream(k), gs):
                s_pos, s_vec = stack.node_vectors(j, delta[j], sources[j], P)
                want = (torch.zeros(len(sources[j]), gx.shape[0] if gx is not None else 3) if gx is None else
                        torch.einsum("bsd,sbd->sb", gx[:, s_pos], s_vec))
                assert torch.allclose(ours[j][:, i], want, atol=1e-5), (k, j, i, ours[j][:, i], want)
        assert all((ours[j] != 0).any() for j in ours), k


def test_sublayer_integrated_gradients_add_up_and_mean_ablation_equals_a_brute_force(split_sublayers,
                                                                                    default_handle):
    """IG's completeness at every site (a sublayer site's scores add up to the metric with that site alone at the
    source value, the rest recomputed); every node kept is the clean run; a circuit and its complement, ablated
    site by site in the model's order, equal the transformers model with the same edits."""
    stack, clean, corr, metric, base, src, delta = split_sublayers
    bridge = default_handle.bridge
    ref = _Blocks(default_handle)
    P = clean.shape[1]
    grads = integrated_level_gradients(bridge, stack, base, src, metric, 32)
    m_base = metric(ref.run(corr))
    for k in range(stack.n_levels):
        total = stack.scores(k, delta[k], grads[k]).sum(1)
        if k == 0:
            whole = metric(ref.run(corr, edit_input=lambda _: src.resid[0]))
        else:
            whole = metric(ref.run(corr, edits={_site_edit(stack, k): (lambda _, k=k: src.resid[k])}))
        assert torch.allclose(total, whole - m_base, rtol=2e-3, atol=2e-2), (stack.sites[k], total, whole - m_base)
    runs = record(bridge, stack, clean)
    K = stack.n_levels
    none = [torch.zeros(0, dtype=torch.long)] * K
    g = torch.Generator().manual_seed(1)
    some = [torch.randperm(stack.n_nodes(k, P), generator=g)[:stack.n_nodes(k, P) // 3] for k in range(K)]
    means = level_means(stack, runs)
    got = evaluate(bridge, stack, runs, means, [(none, True), (some, False), (some, True)], metric)
    assert torch.allclose(got[0], metric(runs.runner.logits(runs.final)), atol=1e-4)
    for i, complement in ((1, False), (2, True)):
        edits = {}
        for k in range(1, K):
            m = torch.zeros(stack.n_nodes(k, P), dtype=torch.bool)
            m[some[k]] = True
            m = ~m if complement else m
            W = stack.width(k)

            def ablate(y, k=k, m=m, W=W):
                acts, err = stack.split(k, y)
                acts = torch.where(m[:P * W].view(P, W), acts, means[k][0])
                err = torch.where(m[P * W:].view(P, 1), err, means[k][1])
                return stack.join(k, acts, err)
            edits[_site_edit(stack, k)] = ablate
        m0 = torch.zeros(P, dtype=torch.bool)
        m0[some[0]] = True
        m0 = ~m0 if complement else m0
        want = metric(ref.run(clean, edit_input=lambda x, m0=m0: torch.where(m0[:, None], x, means[0]), edits=edits))
        assert torch.allclose(got[i], want, atol=1e-4), (i, got[i], want)


# ----------------------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------------------
SMALL_SAES = dict(sae_width=128, sae_steps=150, sae_max_tokens=4096)


@pytest.fixture(scope="module")
def feature_circuit(tmp_path_factory):
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path_factory.mktemp("feature_circuit") / "s.duckdb")
    spec = CircuitSpec(level="features", n_pairs=6, layers=(1, 3, 5), edge_nodes=24, n_points=6, **SMALL_SAES)
    return run(spec, store=store), store


def test_on_the_shipped_ioi_pairs_feature_circuits_track_node_patching(feature_circuit):
    out, store = feature_circuit
    r = out.result
    meta, nodes, table = r.meta, r.extra["nodes"], r.table
    assert meta["sae_layers"] == [1, 3, 5] and meta["n_patched"] == meta["n_nodes"] > 100
    # node names and kinds: the input by position, features and errors of each SAE layer
    kinds = set(nodes["kind"])
    assert kinds == {"input", "feature", "error"}
    assert nodes["node"].str.fullmatch(r"input@\d+|f[135]\.\d+@\d+|err[135]@\d+").all()
    # each gradient method tracks node activation patching (measured 0.92-0.96 on these pairs)
    for m in ("eap", "eap_ig", "relp"):
        assert meta[f"pearson_{m}"] >= 0.8, (m, meta[f"pearson_{m}"])
    # edges join successive levels only, and the last level reaches the logits
    from analysis.analyses.circuit.figures import node_parts

    level = {-1: 0, 1: 1, 3: 2, 5: 3, 10**6: 4}
    for s, t in zip(table["source"], table["target"]):
        assert level[node_parts(t)[0]] == level[node_parts(s)[0]] + 1, (s, t)
    assert set(table["method"]) == {"eap", "eap_ig", "relp"} and np.isfinite(table["score"]).all()
    # the ends of the curves: nothing kept is every node at its mean; every node kept is the clean run
    assert meta["full_metric"] == pytest.approx(meta["clean_metric"], abs=1e-4)
    f = r.extra["faithfulness"]
    assert (f[f["n_nodes"] == 0]["faithfulness"] == 0).all()
    assert set(f["method"]) == {"activation", "eap", "eap_ig", "relp"}
    assert f["n_nodes"].max() == meta["n_nodes"]


def test_with_the_corrupted_run_as_ablation_every_scored_node_recovers_the_clean_run(feature_circuit):
    """Nodes no pair changes are no-ops when ablated to the corrupted run, so the circuit of every scored node is
    the clean run: faithfulness 1 at the end of each curve."""
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.runner import run

    _, store = feature_circuit
    spec = CircuitSpec(level="features", n_pairs=6, layers=(1, 3, 5), edge_nodes=8, n_points=4,
                       methods=("eap",), ablation="corrupted", **SMALL_SAES)
    r = run(spec, store=store).result
    f = r.extra["faithfulness"]
    assert f["faithfulness"].iloc[-1] == pytest.approx(1.0, abs=1e-4)
    assert r.meta["empty_metric"] == pytest.approx(r.meta["corrupted_metric"], abs=1e-4)


def test_feature_circuit_figures_and_neuronpedia_export(feature_circuit):
    from analysis.analyses.circuit.figures import feature_figures, neuronpedia_json

    r = feature_circuit[0].result
    figs = feature_figures(r)
    assert set(figs) == {"graph", "faithfulness", "comparison"}
    # the layout reaches the figures: layers up with their names, positions across under the prompt's tokens
    graph = figs["graph"].layout
    assert graph.yaxis.ticktext == ("input", "resid 1", "resid 3", "resid 5", "logits")
    assert [t.split("<br>")[0] for t in graph.xaxis.ticktext] == [str(t) for t in r.extra["tokens"]["token"]]
    assert figs["faithfulness"].layout.xaxis.type == "log" and "nodes kept" in figs["faithfulness"].layout.xaxis.title.text
    assert "node activation patching" in figs["comparison"].layout.title.text
    graph = json.loads(neuronpedia_json(r, "relp", 30, "default"))
    assert set(graph) == {"metadata", "qParams", "nodes", "links"}
    ids = [n["node_id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids))
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    assert len(graph["links"]) == 30
    types = {n["feature_type"] for n in graph["nodes"]}
    assert "logit" in types and types <= {"embedding", "cross layer transcoder", "mlp reconstruction error", "logit"}
    for n in graph["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            assert n["node_id"] == f"{n['layer']}_{n['feature']}_{n['ctx_idx']}"
    assert graph["metadata"]["prompt_tokens"] == [str(t) for t in r.extra["tokens"]["token"]]
    assert graph["qParams"]["supernodes"] == []
    # a group of nodes (a supernode) goes out as Neuronpedia's supernodes: its name and its members' node ids
    from analysis.analyses.circuit.figures import feature_edges, feature_graph_figure

    shown = list(dict.fromkeys(feature_edges(r.table, "relp", 30)["source"]))[:2]
    grouped = json.loads(neuronpedia_json(r, "relp", 30, "default", [("pair", shown), ("off", ["f1.0@99"])]))
    by_name = {n: i for n, i in zip([n for n in _shown_names(r, "relp", 30)], ids)}
    assert grouped["qParams"]["supernodes"] == [["pair", *[by_name[m] for m in shown]]]
    fig = feature_graph_figure(r, "relp", 30, groups=[("pair", shown)])
    assert len(fig.layout.shapes) == 1 and fig.layout.annotations[0].text == "<b>pair</b>"


def _shown_names(r, method, n):
    from analysis.analyses.circuit.figures import feature_edges, node_parts

    e = feature_edges(r.table, method, n)
    return sorted(set(e["source"]) | set(e["target"]), key=node_parts)


def test_the_estimate_counts_only_the_saes_not_stored(feature_circuit, default_handle):
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.registry import get_analysis
    from analysis.runner import estimate_unstored, resolve_tokens

    _, store = feature_circuit
    a = get_analysis("circuit")
    stored = resolve_tokens(CircuitSpec(level="features", n_pairs=6, layers=(1, 3, 5), **SMALL_SAES), default_handle)
    assert estimate_unstored(a, stored, default_handle, store).upstream == []
    # two of these three SAEs are not in the store (1 and 3 are): their two training runs are upstream
    partly = resolve_tokens(CircuitSpec(level="features", n_pairs=6, layers=(0, 1, 2, 3), **SMALL_SAES),
                            default_handle)
    up = estimate_unstored(a, partly, default_handle, store).upstream
    assert sorted(u.input for u in up) == ["sae.0", "sae.2"]


def test_bad_feature_circuit_requests_get_a_message_and_store_nothing(tmp_path):
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.errors import WorkbenchError
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(WorkbenchError, match="gradient method"):
        run(CircuitSpec(level="features", methods=("activation",), **SMALL_SAES), store=store)
    with pytest.raises(WorkbenchError, match="blocks 0 to 5"):
        run(CircuitSpec(level="features", layers=(2, 9), **SMALL_SAES), store=store)
    two_lengths = json.dumps([{"clean_ids": [0, 5, 6, 7, 8], "corrupted_ids": [0, 5, 9, 7, 8], "answer_id": 10,
                               "wrong_id": 11},
                              {"clean_ids": [0, 5, 6, 7, 8, 12], "corrupted_ids": [0, 5, 9, 7, 8, 12],
                               "answer_id": 10, "wrong_id": 11}])
    with pytest.raises(WorkbenchError, match="one token length"):
        run(CircuitSpec(level="features", dataset="", pairs=two_lengths, layers=(1,), **SMALL_SAES), store=store)
    assert store.count("runs") == 0  # refused before any SAE trained


def test_the_feature_fields_leave_component_circuits_run_keys_as_they_were():
    """Component circuits stored before the feature level existed stay hits: its fields are out of the key at their
    defaults, and those defaults are the spec's own."""
    from analysis.analyses.circuit.spec import CircuitSpec

    d = CircuitSpec().to_dict()
    added = {k: v for k, v in CircuitSpec.key_legacy.items() if k != "bos"}  # bos: every spec's own legacy
    assert {k: d[k] for k in added} == added and len(added) == 12



def test_the_feature_circuit_estimate_matches_its_measured_peak(tmp_path):
    """The estimate the runner gates on, against the peak measured in a fresh process (as every analysis's default
    is in test_estimate.py), the SAEs trained first."""
    from test_estimate import check_within, probe

    fields = {"level": "features", "layers": [1, 3], "n_pairs": 6, "edge_nodes": 16, "n_points": 6, **SMALL_SAES}
    check_within(probe("default", {"circuit": fields}, tmp_path / "s.duckdb"), ["circuit"])


def test_a_batch_plans_each_layers_sae_as_its_own_item_and_a_worker_computes_the_circuit(feature_circuit, tmp_path):
    """The batch and Ray path: the plan holds one SAE item per layer before the circuit (what Ray's actors train
    side by side), and the worker's computation from a payload (the stored SAEs by input name) gives the result the
    runner stored."""
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.batch import compute_payload, payload, plan
    from analysis.result import decode_result

    out, store = feature_circuit
    spec = CircuitSpec(level="features", n_pairs=6, layers=(1, 3, 5), edge_nodes=24, n_points=6, **SMALL_SAES)
    items = plan([spec, spec.replace(layers=(1, 2))], store)
    kinds = [(i.spec.analysis, getattr(i.spec, "layer", None), i.status) for i in items]
    assert kinds == [("sae", 1, "hit"), ("sae", 3, "hit"), ("sae", 5, "hit"), ("circuit", None, "hit"),
                     ("sae", 2, "todo"), ("circuit", None, "todo")]  # layer 1's SAE planned once
    assert items[3].inputs == {"sae.1": ("run", 0), "sae.3": ("run", 1), "sae.5": ("run", 2)}
    assert items[5].inputs == {"sae.1": ("run", 0), "sae.2": ("run", 4)}
    got = compute_payload(payload(items[3], items, store))
    again = decode_result(got["tables"])
    a = again.table.sort_values(["method", "source", "target"]).reset_index(drop=True)
    b = out.result.table.sort_values(["method", "source", "target"]).reset_index(drop=True)
    assert a[["method", "source", "target"]].equals(b[["method", "source", "target"]])
    assert np.allclose(a["score"], b["score"], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Interventions on feature nodes (the circuit_intervention analysis)
# ----------------------------------------------------------------------------------------------------------
def test_feature_interventions_equal_node_patching_and_a_brute_force_through_the_saes(feature_circuit,
                                                                                      default_handle):
    """One feature node patched alone changes each pair's metric by the feature circuit's own activation-patching
    effect for it; several nodes on several layers set at once (mean ablation) equal a brute force through the
    transformers model's blocks, splitting each residual with the stored SAE."""
    from analysis.analyses.circuit.intervene import CircuitInterventionSpec
    from analysis.analyses.circuit.spec import sae_spec_at
    from analysis.analyses.features.sae import SKIP_FIRST, sae_from_result
    from analysis.runner import run

    out, store = feature_circuit
    nodes = out.result.extra["nodes"]
    act = nodes[(nodes["method"] == "activation") & (nodes["kind"] != "input")]
    top = act.reindex(act["score"].abs().sort_values(ascending=False).index)
    per_pair = out.result.extra["per_pair"]
    meta = out.result.meta
    span = meta["clean_metric"] - meta["corrupted_metric"]  # means over pairs: the normalised scale's unit
    for name in top["node"].head(3):
        spec = CircuitInterventionSpec(level="features", n_pairs=6, nodes=(name,), prompts="corrupted",
                                       value="other", **SMALL_SAES)
        r = run(spec, store=store).result
        want = per_pair[(per_pair["method"] == "activation") & (per_pair["node"] == name)].sort_values("pair")
        assert np.allclose(r.table["change"] / span, want["value"], atol=1e-4), name

    feats = top[top["kind"] == "feature"].head(4)
    chosen = list(feats["node"]) + ["err3@5", f"err5@{int(feats['position'].iloc[0])}"]
    spec = CircuitInterventionSpec(level="features", n_pairs=6, nodes=tuple(chosen), prompts="clean", value="mean",
                                   metric="logit_diff", **SMALL_SAES)
    got = run(spec, store=store).result
    saes = {}
    for layer in (1, 3, 5):  # the circuit's SAEs, from the store
        sae_run = run(sae_spec_at(spec, layer), store=store)
        assert sae_run.hit
        saes[layer] = sae_from_result(sae_run.result)[0].float()
    clean, _, ans, wrong = _pairs(default_handle, 6)
    ref = _Blocks(default_handle)
    parsed = {}
    for name in chosen:
        head, pos = name.split("@")
        layer = int(head[3:]) if head.startswith("err") else int(head[1:].split(".")[0])
        feat = -1 if head.startswith("err") else int(head.split(".")[1])
        parsed.setdefault(layer, []).append((feat, int(pos)))

    def split(layer, x):
        acts = saes[layer].encode(x.float())
        if SKIP_FIRST:
            acts = torch.cat([torch.zeros_like(acts[:, :1]), acts[:, 1:]], 1)
        return acts, x.float() - saes[layer].decode(acts)

    # the mean over the clean prompts of each node, from the run that is not intervened
    resid = {}
    hooks = [ref.hf.layers[layer].register_forward_hook(
        lambda m, a, o, layer=layer: resid.__setitem__(layer, (o[0] if isinstance(o, tuple) else o).detach()))
        for layer in parsed]
    with torch.no_grad():
        ref.hf.model(clean)
    for h in hooks:
        h.remove()
    means = {layer: tuple(t.mean(0, keepdim=True) for t in split(layer, resid[layer])) for layer in parsed}

    def edit(layer):
        def fn(x):
            acts, err = split(layer, x)
            for feat, pos in parsed[layer]:
                if feat >= 0:
                    acts[:, pos, feat] = means[layer][0][:, pos, feat]
                else:
                    err[:, pos] = means[layer][1][:, pos]
            return (saes[layer].decode(acts) + err).to(x.dtype)
        return fn

    logits = ref.run(clean, edits={layer: edit(layer) for layer in parsed})
    want = (logits.gather(1, ans[:, None]) - logits.gather(1, wrong[:, None]))[:, 0]
    assert np.allclose(got.table["after"], want.numpy(), atol=1e-3)


def test_feature_circuits_on_loaded_saelens_folders_equal_the_same_saes_trained_here(feature_circuit, tmp_path,
                                                                                     monkeypatch, capsys):
    """The SAEs a researcher holds: each layer's SAE written out as a SAELens folder and loaded back
    (`sae_folders`, the layers read from their cfg.json) gives the same circuit as the SAEs trained here, nodes,
    edges and curves; an intervention on its nodes runs on the same folders. Refused with a message: a folder of
    another hook, two folders of one block, layers that disagree with the folders, sublayer SAEs without a residual
    one at or after their block, a feature past a loaded SAE's width, a node at a site no folder holds, and folders
    on a server that reads none (nothing stored). The command line runs it too."""
    from analysis.analyses.circuit.intervene import CircuitInterventionSpec
    from analysis.analyses.circuit.spec import CircuitSpec, sae_spec_at
    from analysis.analyses.features.sae import save_folder
    from analysis.errors import WorkbenchError
    from analysis.runner import run

    out, store = feature_circuit
    trained = out.result
    spec = CircuitSpec(level="features", n_pairs=6, layers=(1, 3, 5), edge_nodes=24, n_points=6, **SMALL_SAES)
    folders = {}
    for layer in (5, 1, 3):  # in any order: the cfg.json says which block
        sae, cfg = _stored_sae(store, sae_spec_at(spec, layer))
        folders[layer] = str(save_folder(sae, cfg, tmp_path / f"sae{layer}"))
    loaded = CircuitSpec(level="features", n_pairs=6, edge_nodes=24, n_points=6, sae_folders=tuple(folders.values()))
    n_runs = store.count("runs")
    got = run(loaded, store=store)
    assert not got.hit and got.result.meta["sae_layers"] == [1, 3, 5]
    assert got.spec.sae_folders == tuple(folders[la] for la in (1, 3, 5)) and len(got.spec.sae_hashes) == 3
    a = trained.table.sort_values(["method", "source", "target"]).reset_index(drop=True)
    b = got.result.table.sort_values(["method", "source", "target"]).reset_index(drop=True)
    assert a[["method", "source", "target"]].equals(b[["method", "source", "target"]])
    np.testing.assert_allclose(b["score"], a["score"], atol=1e-5)
    fa, fb = trained.extra["faithfulness"], got.result.extra["faithfulness"]
    np.testing.assert_allclose(fb["faithfulness"], fa["faithfulness"], atol=1e-5)
    assert store.count("runs") == n_runs + 4  # the circuit and each folder's SAE run, content-addressed
    assert run(loaded, store=store).hit

    node = trained.extra["nodes"].query("method == 'activation' and kind == 'feature'")["node"].iloc[0]
    iv = run(CircuitInterventionSpec(level="features", n_pairs=6, nodes=(node,), sae_folders=tuple(folders.values())),
             store=store)
    same = run(CircuitInterventionSpec(level="features", n_pairs=6, nodes=(node,), **SMALL_SAES), store=store)
    np.testing.assert_allclose(iv.result.table["after"], same.result.table["after"], atol=1e-5)

    # the command line, which estimates its smaller settings before anything resolves the folders
    from analysis.__main__ import main

    assert main(["circuit", "--level", "features", "--n-pairs", "6", "--methods", "eap", "--n-points", "3",
                 "--sae-folders", ",".join(folders.values()), "--store", str(tmp_path / "cli.duckdb")]) == 0
    assert "computed circuit" in capsys.readouterr().out

    n_runs = store.count("runs")
    sae, cfg = _stored_sae(store, sae_spec_at(spec, 3))
    other = str(save_folder(sae, {**cfg, "hook_name": "blocks.3.hook_resid_mid"}, tmp_path / "mid3"))
    with pytest.raises(WorkbenchError, match="hook_resid_mid; a feature circuit splits the residual"):
        run(loaded.replace(sae_folders=(other,)), store=store)
    mlp = str(save_folder(sae, {**cfg, "hook_name": "blocks.3.hook_mlp_out"}, tmp_path / "mlp3"))
    with pytest.raises(WorkbenchError, match="hold no residual SAE"):
        run(loaded.replace(sae_folders=(mlp,)), store=store)
    late = str(save_folder(sae, {**cfg, "hook_name": "blocks.4.hook_attn_out"}, tmp_path / "attn4"))
    with pytest.raises(WorkbenchError, match="block 4's attention output has no residual SAE at or after its block"):
        run(loaded.replace(sae_folders=(folders[1], folders[3], late)), store=store)
    with pytest.raises(WorkbenchError, match="the folders name every site"):
        run(loaded.replace(sublayers=("mlp_out",)), store=store)
    with pytest.raises(WorkbenchError, match="Two of the folders hold SAEs of block 1"):
        run(loaded.replace(sae_folders=(folders[1], folders[1])), store=store)
    with pytest.raises(WorkbenchError, match="split the residual after blocks \\[1, 3, 5\\], and layers asks"):
        run(loaded.replace(layers=(1, 2)), store=store)
    f = int(node.split(".")[1].split("@")[0])
    width = SMALL_SAES["sae_width"]
    with pytest.raises(WorkbenchError, match=f"features 0 to {width - 1}"):
        run(CircuitInterventionSpec(level="features", n_pairs=6, nodes=(f"f1.{width + f}@3",),
                                    sae_folders=(folders[1],)), store=store)
    with pytest.raises(WorkbenchError, match="none of the SAE folders holds the SAE of block 3's residual"):
        run(CircuitInterventionSpec(level="features", n_pairs=6, nodes=("err3@2",), sae_folders=(folders[1],)),
            store=store)
    monkeypatch.setenv("WORKBENCH_ALLOW_LOCAL_FOLDERS", "0")
    with pytest.raises(WorkbenchError, match="does not read folders"):
        run(loaded.replace(n_points=5), store=store)
    assert store.count("runs") == n_runs


def _stored_sae(store, spec):
    """(SAE, SAELens cfg) of an input's stored SAE run (its spec resolved on the default model)."""
    from analysis import load_model
    from analysis.analyses.features.sae import sae_from_result
    from analysis.registry import get_analysis
    from analysis.runner import resolve_tokens, run_key

    handle = load_model("default")
    key = run_key(handle.fingerprint, resolve_tokens(spec, handle), get_analysis(spec.analysis).version)
    return sae_from_result(store.get(key))


def test_feature_circuits_with_attention_and_mlp_saes(tmp_path):
    """sublayers=attn_out,mlp_out: SAEs also at blocks 1 and 3's attention and MLP outputs, trained as inputs of
    their own. Nodes at every site, edges only from a site of the target's segment that runs before it (the
    residual the segment starts at, or an earlier sublayer), every scored node kept is the clean run (the
    corrupted values outside it), the graph draws a row per site, the export names its rows, each feature links to
    its own SAE's page, and an intervention on an attention feature changes the metric by that node's patching
    effect."""
    import json

    from analysis.analyses.circuit.figures import feature_graph_figure, neuronpedia_json, node_site
    from analysis.analyses.circuit.intervene import CircuitInterventionSpec
    from analysis.analyses.circuit.page import feature_page_link
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    spec = CircuitSpec(level="features", n_pairs=4, layers=(1, 3), sublayers=("mlp_out", "attn_out"), edge_nodes=20,
                       n_points=4, methods=("activation", "eap", "eap_ig", "relp"), metric="logit_diff",
                       ablation="corrupted", **SMALL_SAES)
    out = run(spec, store=store)
    r = out.result
    assert out.spec.sublayers == ("attn_out", "mlp_out")  # in the model's order: one key for either order
    sites = [tuple(x) for x in r.meta["sae_sites"]]
    assert sites == [("attn_out", 1), ("mlp_out", 1), ("resid_post", 1), ("attn_out", 3), ("mlp_out", 3),
                     ("resid_post", 3)]
    assert store.count("runs") == 7  # six SAEs and the circuit
    nodes = r.extra["nodes"]
    assert set(nodes["site"]) == {"input", "attn_out", "mlp_out", "resid_post"}
    assert {node_site(n)[0] for n in nodes["node"]} == {"input", "attn_out", "mlp_out", "resid_post"}
    order = {("input", -1): 0, **{s: i + 1 for i, s in enumerate(sites)}}
    segment = {0: [0], 1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [3], 5: [3, 4], 6: [3, 4, 5]}  # upstream sites
    kinds = set()
    for s, t in zip(r.table["source"], r.table["target"]):
        if t == "logits":
            assert node_site(s)[:2] == ("resid_post", 3)
            continue
        a, b = order[node_site(s)[:2]], order[node_site(t)[:2]]
        assert a in segment[b], (s, t)
        kinds.add((node_site(s)[0], node_site(t)[0]))
    assert {("attn_out", "resid_post"), ("resid_post", "attn_out")} <= kinds, kinds
    f = r.extra["faithfulness"]
    for _, g in f.groupby("method"):
        assert g.sort_values("n_nodes").iloc[-1].faithfulness == pytest.approx(1.0, abs=1e-4)
    fig = feature_graph_figure(r, "eap_ig", 40)
    assert list(fig.layout.yaxis.ticktext) == ["input", "attn 1", "mlp 1", "resid 1", "attn 3", "mlp 3", "resid 3",
                                               "logits"]
    j = json.loads(neuronpedia_json(r, "eap_ig", 40))
    assert j["metadata"]["transcoder_list"][0] == "0: attn_out SAE, block 1"
    ids = {n["node_id"] for n in j["nodes"]}
    assert len(ids) == len(j["nodes"]) and all(lk["source"] in ids and lk["target"] in ids for lk in j["links"])
    act = nodes[(nodes["method"] == "activation") & (nodes["site"] == "attn_out") & (nodes["kind"] == "feature")]
    top = act.reindex(act["score"].abs().sort_values(ascending=False).index).iloc[0]
    assert "site=attn_out" in feature_page_link(out.spec, int(top.layer), int(top.feature), "attn_out")
    iv = run(CircuitInterventionSpec(level="features", n_pairs=4, nodes=(top.node,), prompts="corrupted",
                                     metric="logit_diff", **SMALL_SAES), store=store)
    assert store.count("runs") == 8  # the intervention reuses the circuit's attention SAE
    assert iv.result.meta["change"] == pytest.approx(float(top.score), abs=1e-3)
    # the batch and Ray path: every site's SAE is an item of its own, before the circuit that reads them
    from analysis.batch import plan

    items = plan([spec, spec.replace(sublayers=("attn_out",), layers=(1, 2))], store)
    kinds = [(i.spec.analysis, getattr(i.spec, "site", None), getattr(i.spec, "layer", None), i.status) for i in items]
    assert kinds[:7] == [("sae", s, la, "hit") for s, la in sites] + [("circuit", None, None, "hit")]
    assert kinds[7:] == [("sae", "attn_out", 2, "todo"), ("sae", "resid_post", 2, "todo"),
                         ("circuit", None, None, "todo")]
    assert set(items[6].inputs) == {"sae.1", "sae.3", "sae.attn_out.1", "sae.mlp_out.1", "sae.attn_out.3",
                                    "sae.mlp_out.3"}
