"""Edge circuits (kernels/circuits.py, the `circuit` analysis) against independent references: a brute force with
hooks on the plain transformers model under the bridge (one forward per edge), TransformerLens 4's own edge
attribution patching and faithfulness, and analytic identities (the empty circuit is the corrupted run, the full
one the clean run)."""
from __future__ import annotations

import pytest
import torch

from kernels.circuits import (
    EdgeGraph,
    check_additive,
    edge_hooks,
    edge_patch,
    edge_scores_from,
    evaluate_circuits,
    on_paths,
    reader_gradients,
    record,
)
from kernels.patching import BlockRunner


def _pairs(handle, n=3):
    """Shipped IOI pairs built for the model's tokenizer: clean, corrupted [n, P], answer, wrong [n]."""
    from analysis.analyses.patching.spec import _shipped_pairs

    pairs, _ = _shipped_pairs(handle, n, "auto")
    t = lambda k: torch.tensor([p[k] for p in pairs])  # noqa: E731
    return t("clean_ids"), t("corrupted_ids"), t("answer_id"), t("wrong_id")


def _logit_diff(answer, wrong):
    def metric_rows(logits):  # rows (patch, pair)
        n = logits.shape[0] // answer.shape[0]
        a, w = answer.repeat(n)[:, None], wrong.repeat(n)[:, None]
        return (logits.gather(1, a) - logits.gather(1, w))[:, 0]
    return metric_rows


# ----------------------------------------------------------------------------------------------------------
# The brute force: plain transformers, one forward per edge
# ----------------------------------------------------------------------------------------------------------
class _HF:
    """Writers' outputs and edge edits on the transformers model itself (GPT-2, Llama, GPT-NeoX layouts)."""

    def __init__(self, handle):
        from transformers import AutoModelForCausalLM

        # a fresh copy from the model's folder: nothing of the bridge's wrapping in its forward
        self.model = AutoModelForCausalLM.from_pretrained(handle.path, dtype=torch.float32).eval()
        cfg = self.model.config
        self.arch = cfg.model_type
        if self.arch == "gpt2":
            body = self.model.transformer
            self.layers, self.final_norm = body.h, body.ln_f
            self.parts = [(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp) for b in body.h]
        elif self.arch == "llama":
            body = self.model.model
            self.layers, self.final_norm = body.layers, body.norm
            self.parts = [(b.input_layernorm, None, b.self_attn.o_proj, b.post_attention_layernorm, b.mlp)
                          for b in body.layers]
        else:
            body = self.model.gpt_neox
            self.layers, self.final_norm = body.layers, body.final_layer_norm
            self.parts = [(b.input_layernorm, b.attention.query_key_value, b.attention.dense,
                           b.post_attention_layernorm, b.mlp) for b in body.layers]
        self.n_heads = cfg.num_attention_heads if self.arch != "gpt2" else cfg.n_head
        self.d = cfg.hidden_size

    def _head_results(self, proj, z):
        """z [B, S, H * dh] (the output projection's input) -> each head's share of its output [B, S, H, D]."""
        H = self.n_heads
        dh = z.shape[-1] // H
        zh = z.reshape(*z.shape[:-1], H, dh)
        w = proj.weight
        if self.arch == "gpt2":  # Conv1D: [in, out]
            return torch.einsum("bshe,hed->bshd", zh, w.reshape(H, dh, -1))
        return torch.einsum("bshe,dhe->bshd", zh, w.reshape(w.shape[0], H, dh))

    def writers(self, tokens):
        """[B, S, n_sources, D] in EdgeGraph's order: input, then per layer the heads and the MLP."""
        got, handles = {}, []
        handles.append(self.layers[0].register_forward_pre_hook(
            lambda m, a, k: got.__setitem__("input", (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True))
        for i, (_, _, proj, _, mlp) in enumerate(self.parts):
            handles.append(proj.register_forward_pre_hook(
                lambda m, a, i=i, proj=proj: got.__setitem__(f"a{i}", self._head_results(proj, a[0]).detach())))
            handles.append(mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"m{i}", o.detach())))
        try:
            with torch.no_grad():
                self.model(tokens)
        finally:
            for h in handles:
                h.remove()
        parts = [got["input"][:, :, None]]
        for i in range(len(self.parts)):
            parts += [got[f"a{i}"], got[f"m{i}"][:, :, None]]
        return torch.cat(parts, 2)

    def logits_with(self, tokens, edit):
        """Final-position logits with `edit` = (kind, layer, head, delta [B, S, D]) added to one reader's input."""
        kind, layer, head, delta = edit
        handles = []
        if kind == "logits":
            handles.append(self.final_norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,) + a[1:]))
        elif kind == "mlp":
            handles.append(self.parts[layer][3].register_forward_pre_hook(lambda m, a: (a[0] + delta,) + a[1:]))
        else:  # q/k/v of one head (GPT-2's joint projection): that head's slice from the edited residual
            ln1, qkv = self.parts[layer][0], self.parts[layer][1]
            seen = {}
            handles.append(ln1.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])))
            dh = self.d // self.n_heads
            at = "qkv".index(kind) * self.d + head * dh

            def swap(m, a, out):
                alt = qkv.forward(ln1.forward(seen["x"] + delta))  # .forward: not through the hooks
                out = out.clone()
                out[..., at:at + dh] = alt[..., at:at + dh]
                return out
            handles.append(qkv.register_forward_hook(swap))
        try:
            with torch.no_grad():
                return self.model(tokens).logits[:, -1]
        finally:
            for h in handles:
                h.remove()


def _brute_force(handle, graph, base, source, metric_rows, edges, positions=None):
    hf = _HF(handle)
    delta = hf.writers(source) - hf.writers(base)
    out = []
    for i, (u, d) in enumerate(edges):
        r = graph.readers[d]
        change = delta[:, :, u]
        if positions is not None:  # that position's change alone
            change = torch.zeros_like(change).index_copy(1, torch.tensor([positions[i]]),
                                                         change[:, positions[i]:positions[i] + 1])
        out.append(metric_rows(hf.logits_with(base, (r.kind, r.layer, r.head, change))))
    return torch.stack(out)  # [E, B]


def _edge_patching(handle, base, source, metric_rows, edges=None):
    bridge = handle.bridge
    graph = EdgeGraph.of(bridge)
    with edge_hooks(bridge):
        wb, rb, _ = record(bridge, graph, base)
        ws, _, _ = record(bridge, graph, source)
        runner = BlockRunner(bridge, base)
        edges = graph.edges if edges is None else edges
        return graph, edges, edge_patch(bridge, graph, runner, rb[:, :, -1], ws - wb, edges, metric_rows)


@pytest.mark.parametrize("which", ["default", "gpt2", "llama", "neox"])
def test_edge_patching_into_mlps_and_logits_equals_a_brute_force(which, default_handle, tiny_dirs):
    from analysis import load_model

    handle = default_handle if which == "default" else load_model(str(tiny_dirs[which]))
    clean, corrupted, answer, wrong = _pairs(handle)
    metric_rows = _logit_diff(answer, wrong)
    graph = EdgeGraph.of(handle.bridge)
    edges = [(u, d) for u, d in graph.edges if graph.readers[d].kind in ("mlp", "logits")]
    _, _, ours = _edge_patching(handle, corrupted, clean, metric_rows, edges)
    want = _brute_force(handle, graph, corrupted, clean, metric_rows, edges)
    assert ours.shape == want.shape == (len(edges), clean.shape[0])
    assert (want - want[:1]).abs().max() > 1e-3  # the edges do differ
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    if which == "neox":  # parallel blocks: a layer's heads do not feed its own MLP
        assert "a0.h0->m0" not in {graph.edge_name(u, d) for u, d in graph.edges}
    assert handle.bridge.cfg.use_attn_result is False and handle.bridge.cfg.use_split_qkv_input is False


def test_edge_patching_into_heads_q_k_v_equals_a_brute_force(default_handle):
    clean, corrupted, answer, wrong = _pairs(default_handle, 2)
    metric_rows = _logit_diff(answer, wrong)
    graph = EdgeGraph.of(default_handle.bridge)
    edges = [(u, d) for u, d in graph.edges if graph.readers[d].kind in "qkv" and graph.readers[d].layer in (1, 4)]
    assert {graph.readers[d].kind for _, d in edges} == {"q", "k", "v"}
    _, _, ours = _edge_patching(default_handle, corrupted, clean, metric_rows, edges)
    want = _brute_force(default_handle, graph, corrupted, clean, metric_rows, edges)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)


def test_eap_equals_transformer_lens_edge_attribution_patching(default_handle):
    """TransformerLens 4's edge AtP scores per position (writer and reader at one position); summed over positions
    they are our edge scores (the same denoising convention: gradient on the corrupted run)."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    clean, corrupted, answer, wrong = _pairs(default_handle, 2)
    bridge = default_handle.bridge
    graph = EdgeGraph.of(bridge)
    metric_rows = _logit_diff(answer, wrong)
    with edge_hooks(bridge):
        wb, _, _ = record(bridge, graph, corrupted)
        ws, _, _ = record(bridge, graph, clean)
        ours = edge_scores_from(graph, ws - wb, reader_gradients(bridge, graph, corrupted, metric_rows)).mean(0)
    tl = {}
    for i in range(clean.shape[0]):  # one pair at a time: its own metric
        a, w = int(answer[i]), int(wrong[i])
        res = attribution_patch(bridge, clean[i:i + 1], corrupted[i:i + 1],
                                lambda logits, a=a, w=w: logits[0, -1, a] - logits[0, -1, w],
                                EdgeAttributionConfig(granularity="edge"))
        for (u, d), v in res.edge_scores.items():
            key = (_tl_name(u), _tl_name(d))
            tl[key] = tl.get(key, 0.0) + v / clean.shape[0]
    assert bridge.cfg.use_attn_result is False  # both put the flags back
    theirs = torch.tensor([tl[(graph.sources[u], graph.targets[d])] for u, d in graph.edges])
    mine = torch.stack([ours[u, d] for u, d in graph.edges])
    assert len(tl) == len(graph.edges)
    torch.testing.assert_close(mine, theirs.float(), atol=2e-4, rtol=1e-3)


def test_edges_by_position_patch_and_score_as_a_brute_force_and_transformer_lens_do(default_handle):
    """Edges u@p -> d@p (the residual stream at p carries a writer's output at p to the readers at p): one edge
    patched at one position equals a brute force with hooks on plain transformers (MLP, q, k, v and logits
    readers); EAP by position equals TransformerLens 4's edge `attribution_patch`, whose nodes carry positions;
    summed over positions it is the edge's EAP score."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    clean, corrupted, answer, wrong = _pairs(default_handle, 2)
    bridge = default_handle.bridge
    graph = EdgeGraph.of(bridge)
    metric_rows = _logit_diff(answer, wrong)
    S = clean.shape[1]
    rng = torch.Generator().manual_seed(0)
    pick = {kind: [e for e in graph.edges if graph.readers[e[1]].kind == kind] for kind in ("q", "k", "v", "mlp")}
    edges = [tuple(pick[kind][int(i)]) for kind in pick for i in torch.randint(len(pick[kind]), (4,), generator=rng)]
    edges += [tuple(e) for e in graph.edges if graph.readers[e[1]].kind == "logits"][:3]
    positions = [int(p) for p in torch.randint(1, S, (len(edges),), generator=rng)]
    positions[-3:] = [S - 1, S - 1, S - 2]  # into the logits: only the last position counts
    with edge_hooks(bridge):
        wb, rb, lb = record(bridge, graph, corrupted)
        ws, _, _ = record(bridge, graph, clean)
        ours = edge_patch(bridge, graph, BlockRunner(bridge, corrupted), rb[:, :, -1], ws - wb, edges, metric_rows,
                          positions=positions)
        by_pos = edge_scores_from(graph, ws - wb, reader_gradients(bridge, graph, corrupted, metric_rows),
                                  per_position=True)
        summed = edge_scores_from(graph, ws - wb, reader_gradients(bridge, graph, corrupted, metric_rows))
    want = _brute_force(default_handle, graph, corrupted, clean, metric_rows, edges, positions)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    assert (ours[-1] - metric_rows(lb)).abs().max() < 1e-5  # into the logits, not at the last position
    assert (want - want[:1]).abs().max() > 1e-3
    torch.testing.assert_close(by_pos.sum(1), summed, atol=1e-4, rtol=1e-4)
    assert by_pos.shape == (2, S, len(graph.sources), len(graph.targets))
    tl = {}
    for i in range(clean.shape[0]):
        a, w = int(answer[i]), int(wrong[i])
        res = attribution_patch(bridge, clean[i:i + 1], corrupted[i:i + 1],
                                lambda logits, a=a, w=w: logits[0, -1, a] - logits[0, -1, w],
                                EdgeAttributionConfig(granularity="edge"))
        for (u, d), v in res.edge_scores.items():
            assert u.position == d.position
            key = (_tl_name(u), _tl_name(d), u.position)
            tl[key] = tl.get(key, 0.0) + v / clean.shape[0]
    mean = by_pos.mean(0)
    keys = [k for k in tl if k[2] >= 1][:400]
    theirs = torch.tensor([tl[k] for k in keys])
    mine = torch.stack([mean[p, graph.source_index[u], graph.target_index[d]] for u, d, p in keys])
    torch.testing.assert_close(mine, theirs.float(), atol=2e-4, rtol=1e-3)


def test_circuits_by_position_score_what_transformer_lens_faithfulness_measures(default_handle):
    """A circuit that keeps edges at some positions only: every other (edge, position) carries the corrupted
    run's writer output. Equal to TransformerLens 4's `faithfulness` with the same positioned edges, per pair; a
    circuit kept at every position equals the same circuit without positions."""
    from transformer_lens.tools.analysis.attribution_patching import FaithfulnessConfig, faithfulness

    clean, corrupted, answer, wrong = _pairs(default_handle, 2)
    bridge = default_handle.bridge
    graph = EdgeGraph.of(bridge)
    metric_rows = _logit_diff(answer, wrong)
    S = clean.shape[1]
    with edge_hooks(bridge):
        wc, _, _ = record(bridge, graph, clean)
        wx, _, _ = record(bridge, graph, corrupted)
        scores = edge_scores_from(graph, wc - wx, reader_gradients(bridge, graph, clean, metric_rows),
                                  per_position=True).abs().sum(0)  # [S, U, V]
        order = scores.flatten().argsort(descending=True)[:150]
        keep = torch.zeros(S, *graph.mask.shape, dtype=torch.bool)
        keep.view(-1)[order] = True
        keep &= graph.mask
        everywhere = torch.zeros_like(graph.mask)
        everywhere[tuple(torch.tensor(graph.edges[:300]).T)] = True
        got = evaluate_circuits(bridge, graph, clean, wx, torch.stack([keep, graph.mask & ~keep,
                                                                        everywhere.expand(S, -1, -1)]), metric_rows)
        plain = evaluate_circuits(bridge, graph, clean, wx, everywhere[None], metric_rows)
    torch.testing.assert_close(got[2], plain[0], atol=1e-5, rtol=0)
    kept = keep.nonzero().tolist()  # (p, u, d)
    rest = (graph.mask & ~keep).nonzero().tolist()
    assert len(kept) > 50 and len(rest) > 1000
    for i in range(2):
        a, w = int(answer[i]), int(wrong[i])
        for value, chosen in zip(got[:2, i], (kept, rest)):
            circuit = [(_tl_node(graph.sources[u], p), _tl_node(graph.targets[d], p, bridge.cfg.n_layers))
                       for p, u, d in chosen]
            res = faithfulness(bridge, clean[i:i + 1], corrupted[i:i + 1],
                               lambda logits, a=a, w=w: logits[0, -1, a] - logits[0, -1, w], circuit,
                               FaithfulnessConfig(ablation="corrupt"))
            assert float(value) == pytest.approx(res.corrupt_metric + res.recovered * (res.full_metric
                                                                                      - res.corrupt_metric), abs=1e-4)


@pytest.mark.parametrize("shape", [(3, 2, 2, False), (2, 4, 2, False), (2, 2, 2, True)])
def test_pruning_by_position_keeps_the_edges_a_search_finds_on_paths_to_the_logits(shape):
    """on_paths_by_position against a breadth-first search over the explicit nodes (writer, position) and
    (reader, position): a kept edge stays exactly when its writer is reached from an input position and its reader
    reaches the logits at the last position (a head at p reads its query at p, its keys and values up to p).
    Random keep masks on small graphs, grouped-query and parallel ones among them."""
    from collections import deque

    from kernels.circuits import on_paths_by_position, reader_owners

    n_layers, n_heads, n_kv, parallel = shape
    graph = EdgeGraph(n_layers, n_heads, n_kv, parallel)
    S = 4
    owners = reader_owners(graph)
    kinds = [r.kind for r in graph.readers]
    last = len(graph.targets) - 1
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        keep = (torch.rand(S, *graph.mask.shape, generator=g) < 0.12) & graph.mask
        got = on_paths_by_position(graph, keep)
        kept = keep.nonzero().tolist()

        def succ(node):  # ("w", u, p) -> readers through kept edges; ("r", j, p) -> the writers reading it
            side, i, p = node
            if side == "w":
                return [("r", d, p) for q, u, d in kept if u == i and q == p]
            if kinds[i] == "logits":
                return []
            later = range(p, S) if kinds[i] in ("k", "v") else [p]
            return [("w", u, p2) for u in owners[i] for p2 in later]

        def search(starts, step):
            seen, todo = set(starts), deque(starts)
            while todo:
                for nxt in step(todo.popleft()):
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            return seen

        forward = search([("w", 0, p) for p in range(S)], succ)
        preds: dict = {}
        for node in ([("w", u, p) for u in range(len(graph.sources)) for p in range(S)]
                     + [("r", j, p) for j in range(len(kinds)) for p in range(S)]):
            for nxt in succ(node):
                preds.setdefault(nxt, set()).add(node)
        backward = search([("r", last, S - 1)], lambda n: preds.get(n, ()))
        want = torch.zeros_like(keep)
        for p, u, d in kept:
            if ("w", u, p) in forward and ("r", d, p) in backward:
                want[p, u, d] = True
        assert torch.equal(got, want), seed


def _tl_name(node) -> str:
    if node.kind == "embed":
        return "input"
    if node.kind == "attn_head_out":
        return f"a{node.layer}.h{node.head}"
    if node.kind == "mlp_out":
        return f"m{node.layer}"
    if node.kind == "mlp_in":
        return f"m{node.layer}"
    if node.kind == "logits":
        return "logits"
    return f"a{node.layer}.h{node.head}<{node.kind[0]}>"


def test_the_empty_circuit_is_the_corrupted_run_and_the_full_one_the_clean_run(tiny_handle):
    clean, corrupted, answer, wrong = _pairs(tiny_handle)
    bridge = tiny_handle.bridge
    graph = EdgeGraph.of(bridge)
    metric_rows = _logit_diff(answer, wrong)
    with edge_hooks(bridge):
        wc, rc, lc = record(bridge, graph, clean)
        wx, _, lx = record(bridge, graph, corrupted)
        check_additive(graph, wc, rc)
        keep = torch.stack([graph.mask, torch.zeros_like(graph.mask)])
        got = evaluate_circuits(bridge, graph, clean, wx, keep, metric_rows)
    torch.testing.assert_close(got[0], metric_rows(lc), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], metric_rows(lx), atol=1e-5, rtol=0)
    assert (metric_rows(lc) - metric_rows(lx)).abs().max() > 1e-3


def test_a_circuit_scores_what_transformer_lens_faithfulness_measures(default_handle):
    """A circuit of the top edges: our ablated metric equals TransformerLens 4's `faithfulness` (every position's
    copy of the kept edges kept, every other edge given the corrupted run's writer output)."""
    from transformer_lens.tools.analysis.attribution_patching import FaithfulnessConfig, faithfulness

    clean, corrupted, answer, wrong = _pairs(default_handle, 1)
    bridge = default_handle.bridge
    graph = EdgeGraph.of(bridge)
    metric_rows = _logit_diff(answer, wrong)
    with edge_hooks(bridge):
        wc, _, lc = record(bridge, graph, clean)
        wx, _, lx = record(bridge, graph, corrupted)
        scores = edge_scores_from(graph, wc - wx, reader_gradients(bridge, graph, clean, metric_rows))[0].abs()
        order = scores[graph.mask].argsort(descending=True)
        keep = torch.zeros_like(graph.mask)
        chosen = [tuple(graph.edges[i]) for i in order[:60].tolist()]
        for u, d in chosen:
            keep[u, d] = True
        # the circuit (few edges kept: a running sum less the kept terms) and the model without it (few edges
        # ablated: the ablated terms alone)
        ours = evaluate_circuits(bridge, graph, clean, wx, torch.stack([keep, graph.mask & ~keep]), metric_rows)
    a, w = int(answer[0]), int(wrong[0])
    clean_m, corrupted_m = float(metric_rows(lc)[0]), float(metric_rows(lx)[0])
    complement = [e for e in graph.edges if tuple(e) not in set(chosen)]
    recovered = []
    for got, edges in zip(ours[:, 0], (chosen, complement)):
        circuit = [(_tl_node(graph.sources[u], p), _tl_node(graph.targets[d], p, bridge.cfg.n_layers))
                   for u, d in edges for p in range(clean.shape[1])]
        res = faithfulness(bridge, clean, corrupted, lambda logits: logits[0, -1, a] - logits[0, -1, w], circuit,
                           FaithfulnessConfig(ablation="corrupt"))
        assert res.full_metric == pytest.approx(clean_m, abs=1e-5)
        assert float(got) == pytest.approx(corrupted_m + res.recovered * (clean_m - corrupted_m), abs=1e-4)
        recovered.append(res.recovered)
    assert 0.05 < recovered[0] < 0.99 and recovered[1] < 0.5  # neither circuit is the empty or the full one


def test_mean_ablation_scores_what_transformer_lens_faithfulness_measures_with_held_out_means(default_handle):
    """`edge_ablation="mean"`: every edge outside the circuit carries its writer's mean over the *other* pairs'
    clean prompts (held out, as TransformerLens 4's `faithfulness(ablation="mean", mean_tokens=...)` requires).
    Each pair's ablated metric, for a circuit and its complement, equals TransformerLens's with the other pairs as
    its calibration batch."""
    from transformer_lens.tools.analysis.attribution_patching import FaithfulnessConfig, faithfulness

    clean, corrupted, answer, wrong = _pairs(default_handle, 4)
    bridge = default_handle.bridge
    graph = EdgeGraph.of(bridge)
    metric_rows = _logit_diff(answer, wrong)
    with edge_hooks(bridge):
        wc, rc, lc = record(bridge, graph, clean)
        wx, _, _ = record(bridge, graph, corrupted)
        held_out = (wc.sum(0, keepdim=True) - wc) / (len(wc) - 1)  # what the analysis gives evaluate_circuits
        scores = edge_scores_from(graph, wc - wx, reader_gradients(bridge, graph, clean, metric_rows)).abs().sum(0)
        order = scores[graph.mask].argsort(descending=True)
        keep = torch.zeros_like(graph.mask)
        chosen = [tuple(graph.edges[i]) for i in order[:60].tolist()]
        for u, d in chosen:
            keep[u, d] = True
        ours = evaluate_circuits(bridge, graph, clean, held_out,
                                 torch.stack([keep, graph.mask & ~keep, torch.zeros_like(keep)]), metric_rows)
    complement = [e for e in graph.edges if tuple(e) not in set(chosen)]
    for i in (0, 2):  # two of the pairs, each against the other three
        a, w = int(answer[i]), int(wrong[i])
        others = clean[[j for j in range(len(clean)) if j != i]]
        for got, edges in zip(ours[:2, i], (chosen, complement)):
            circuit = [(_tl_node(graph.sources[u], p), _tl_node(graph.targets[d], p, bridge.cfg.n_layers))
                       for u, d in edges for p in range(clean.shape[1])]
            res = faithfulness(bridge, clean[i:i + 1], corrupted[i:i + 1],
                               lambda logits: logits[0, -1, a] - logits[0, -1, w], circuit,
                               FaithfulnessConfig(ablation="mean"), mean_tokens=others)
            tl_metric = res.corrupt_metric + res.recovered * (res.full_metric - res.corrupt_metric)
            assert float(got) == pytest.approx(tl_metric, abs=1e-4)
    # the empty circuit: every reader reads the held-out mean of its own input (inputs are sums of writers), so the
    # logits are those of the other pairs' mean final residual
    final = rc[:, :, -1]
    with torch.no_grad():
        held_final = (final.sum(0, keepdim=True) - final) / (len(final) - 1)
        expected = metric_rows(BlockRunner(bridge, clean).logits(held_final))
    torch.testing.assert_close(ours[2], expected.float(), atol=1e-4, rtol=0)
    assert (ours[2] - metric_rows(lc)).abs().max() > 1e-2


def _tl_node(name: str, position: int, n_layers: int = 0):
    from transformer_lens.tools.analysis.attribution_patching import Node

    if name == "input":
        return Node(kind="embed", position=position)
    if name == "logits":
        return Node(kind="logits", position=position, layer=n_layers - 1)
    if name.startswith("m"):
        return Node(kind="mlp_in" if n_layers else "mlp_out", position=position, layer=int(name[1:]))
    layer, rest = name[1:].split(".h")
    if "<" in rest:
        head, kind = rest[:-1].split("<")
        return Node(kind=f"{kind}_input", position=position, layer=int(layer), head=int(head))
    return Node(kind="attn_head_out", position=position, layer=int(layer), head=int(rest))


def test_pruning_keeps_only_edges_on_a_path_from_input_to_logits():
    g = EdgeGraph(n_layers=2, n_heads=2)
    keep = torch.zeros_like(g.mask)
    s, t = g.source_index, g.target_index

    def edge(a, b):
        keep[s[a], t[b]] = True
    edge("input", "a0.h0<v>")
    edge("a0.h0", "m0")
    edge("m0", "logits")          # input -> a0.h0 -> m0 -> logits: a path
    edge("a0.h1", "logits")       # a0.h1 has no input: dropped
    edge("input", "a1.h1<q>")     # a1.h1 reaches nothing: dropped
    edge("input", "m1")           # m1 reaches nothing: dropped
    kept = on_paths(g, keep)
    names = {g.edge_name(u, d) for u, d in kept.nonzero().tolist()}
    assert names == {"input->a0.h0<v>", "a0.h0->m0", "m0->logits"}
    assert on_paths(g, g.mask).equal(g.mask)  # every edge of the full graph is on a path
    assert not on_paths(g, torch.zeros_like(g.mask)).any()


def test_the_graph_has_the_eap_ig_librarys_names_and_counts():
    g = EdgeGraph(n_layers=12, n_heads=12)  # GPT-2 small: the EAP-IG library's 32,491 edges
    assert len(g.sources) == 1 + 12 * 13 and len(g.targets) == 12 * 37 + 1
    assert len(g.edges) == 32491
    assert g.sources[:3] == ["input", "a0.h0", "a0.h1"] and g.targets[-1] == "logits"
    assert g.edge_name(g.source_index["a3.h7"], g.target_index["a5.h2<k>"]) == "a3.h7->a5.h2<k>"
    assert not g.mask[g.source_index["m5"], g.target_index["a5.h0<q>"]]  # no edge backwards or within a head
    assert g.mask[g.source_index["a5.h0"], g.target_index["m5"]]
    gqa = EdgeGraph(n_layers=1, n_heads=4, n_kv_heads=2)
    assert "a0.h1<k>" in gqa.targets and "a0.h2<k>" not in gqa.targets and "a0.h3<q>" in gqa.targets


@pytest.mark.parametrize("method", ["atp", "relp"])
def test_edge_scores_out_of_a_writer_add_up_to_its_node_score(method, tiny_handle, default_handle):
    """A writer's output reaches the metric only through the readers after it, so its edges' scores add up to its
    node score: AtP and RelP node scores of kernels/attribution (checked against references in
    test_attribution.py) on the ordinary forward, edge scores on the split one. For RelP this checks that the LN
    rule reaches the per-head norms of the split q/k/v inputs."""
    from kernels.attribution import LRPRules, attribution_scores
    from kernels.patching import source_activations

    for handle in (tiny_handle, default_handle):
        clean, corrupted, answer, wrong = _pairs(handle, 2)
        bridge = handle.bridge
        graph = EdgeGraph.of(bridge)
        metric_rows = _logit_diff(answer, wrong)
        rules = LRPRules() if method == "relp" else None
        comps = ["resid_pre", "z_all_pos", "mlp_out"]
        source = {k: v for c in comps for k, v in source_activations(bridge, clean, c).items()}
        nodes = attribution_scores(bridge, corrupted, source, comps, lambda logits: metric_rows(logits).sum(), rules)
        with edge_hooks(bridge):
            wb, _, _ = record(bridge, graph, corrupted)
            ws, _, _ = record(bridge, graph, clean)
            edges = edge_scores_from(graph, ws - wb, reader_gradients(bridge, graph, corrupted, metric_rows,
                                                                     rules=rules))
        out = edges.sum(2)  # [B, n_sources]
        want = torch.zeros_like(out)
        want[:, 0] = nodes["resid_pre"][0].sum(0)
        for layer in range(graph.n_layers):
            for h in range(graph.n_heads):
                want[:, graph.source_index[f"a{layer}.h{h}"]] = nodes["z_all_pos"][layer, h]
            want[:, graph.source_index[f"m{layer}"]] = nodes["mlp_out"][layer].sum(0)
        torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-3)
    if method == "relp":  # and the rules do change the scores
        with edge_hooks(bridge):
            plain = edge_scores_from(graph, ws - wb, reader_gradients(bridge, graph, corrupted, metric_rows))
        assert not torch.allclose(plain, edges, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# The analysis: runner, store, refusals, page
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ioi_circuit(tmp_path_factory):
    """The default Circuits run on the shipped model's IOI pairs (every method, every edge patched)."""
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path_factory.mktemp("circuit") / "s.duckdb")
    return run(CircuitSpec(), store=store), store


def test_on_the_shipped_ioi_pairs_each_method_tracks_edge_patching_and_its_circuits_are_faithful(ioi_circuit):
    out, store = ioi_circuit
    t, meta, extra = out.result.table, out.result.meta, out.result.extra
    assert meta["n_edges"] == 1108 and meta["patched_edges"] == "every edge"
    assert t.groupby("method").size().to_dict() == {m: 1108 for m in ("activation", "eap", "eap_ig", "relp")}
    # measured on this model (8 pairs): EAP-IG 0.904, RelP 0.939, EAP 0.952
    assert meta["pearson_eap_ig"] >= 0.9 and meta["pearson_relp"] >= 0.92 and meta["pearson_eap"] >= 0.93, meta
    # the per-pair values are the reported score's pairs: their mean is it
    pp = extra["per_pair"]
    act = pp[pp["method"] == "activation"].groupby(["source", "target"])["value"].mean()
    score = t[t["method"] == "activation"].set_index(["source", "target"])["score"]
    assert (act - score.reindex(act.index)).abs().max() < 1e-4
    assert ((t["ci_low"] <= t["score"] + 1e-6) & (t["score"] <= t["ci_high"] + 1e-6)).all()
    # the ends of every curve: nothing kept is the corrupted run (0), everything kept the clean run (1)
    f, c = extra["faithfulness"], extra["completeness"]
    for method, g in f.groupby("method"):
        first, last = g.sort_values("n_edges").iloc[[0, -1]].itertuples()
        assert first.n_edges == 0 and first.faithfulness == 0.0 and first.metric == pytest.approx(
            meta["corrupted_metric"], abs=1e-4)
        assert last.n_edges == 1108 and last.faithfulness == pytest.approx(1.0, abs=1e-6)
        assert last.metric == pytest.approx(meta["clean_metric"], abs=1e-4)
        gone = c[(c["method"] == method) & (c["n_edges"] == 1108)].iloc[0]
        assert gone.completeness == pytest.approx(0.0, abs=1e-6)  # the model without every edge
        n80 = meta[f"edges_for_80_{method}"]
        assert n80 is not None and n80 <= 200, (method, n80)  # measured: 46 (EAP-IG) to 87 of 1,108
    assert store.count("runs") == 1


def test_groups_of_nodes_parse_are_outlined_and_sum_their_members_edges(ioi_circuit):
    """Supernodes: 'name: node + node; …' parsed (and written back the same), refused when malformed; outlined
    and named in the graph; their edges the sums of their members' shown edges (against a loop over the edges)."""
    from analysis.analyses.circuit.figures import (
        circuit_edges,
        format_groups,
        graph_figure,
        graph_of,
        group_edges,
        node_of_target,
        parse_groups,
    )

    groups = parse_groups(" movers: a5.h1 + a4.h3 ; mlps: m2+m3+m2")
    assert groups == [("movers", ["a5.h1", "a4.h3"]), ("mlps", ["m2", "m3"])]
    assert parse_groups(format_groups(groups)) == groups and parse_groups("") == []
    for bad in ("m1 + m2", "a: ", "<b>x</b>: m1", "a: m1; a: m2", "a: m1; b: m1", ";".join(f"g{i}: m{i}"
                                                                                        for i in range(17))):
        with pytest.raises(ValueError):
            parse_groups(bad)
    out, _ = ioi_circuit
    t, meta = out.result.table, out.result.meta
    graph = graph_of(meta)
    kept = circuit_edges(t, meta, "eap_ig", 60)
    members = list(dict.fromkeys(kept["source"]))[1:3]
    got = group_edges(kept, [("g", members)], lambda x: node_of_target(graph, x)).set_index(["source", "target"])
    want: dict = {}
    for r in kept.itertuples():
        s = "g" if r.source in members else r.source
        d = "g" if node_of_target(graph, r.target) in members else node_of_target(graph, r.target)
        if s != d and "g" in (s, d):
            n, v = want.get((s, d), (0, 0.0))
            want[(s, d)] = (n + 1, v + r.score)
    assert set(got.index) == set(want) and len(want) > 0
    for k, (n, v) in want.items():
        assert got.loc[k, "edges"] == n and got.loc[k, "score"] == pytest.approx(v, abs=1e-6)
    fig = graph_figure(t, meta, "eap_ig", 60, groups=[("g", members), ("unseen", ["a0.h0@3"])])
    assert len(fig.layout.shapes) == 1 and [a.text for a in fig.layout.annotations] == ["<b>g</b>"]


def test_the_graph_exports_in_the_eap_ig_librarys_format(ioi_circuit):
    import json

    from analysis.analyses.circuit.figures import circuit_edges, eap_ig_json, graph_figure

    out, _ = ioi_circuit
    t, meta = out.result.table, out.result.meta
    kept = circuit_edges(t, meta, "eap_ig", 40)
    assert 0 < len(kept) <= 40
    d = json.loads(eap_ig_json(t, meta, "eap_ig", 40))
    assert set(d) == {"cfg", "nodes", "edges"} and d["cfg"]["n_layers"] == 6 and d["cfg"]["n_heads"] == 4
    assert d["cfg"]["d_model"] == 128 and d["cfg"]["parallel_attn_mlp"] is False  # what the library's reader needs
    assert len(d["edges"]) == 1108 and len(d["nodes"]) == 32  # the library's sources plus the logits
    assert {k for k, v in d["edges"].items() if v["in_graph"]} == {f"{s}->{t}" for s, t in zip(kept["source"],
                                                                                              kept["target"])}
    one = kept.iloc[0]
    assert d["edges"][f"{one.source}->{one.target}"]["score"] == pytest.approx(float(one.score))
    fig = graph_figure(t, meta, "eap_ig", 40, pinned=one.source)
    assert any("edge" in str(tr.hovertemplate) for tr in fig.data)
    assert "edges on a path input → logits" in fig.layout.title.text and fig.layout.xaxis.visible is False


def test_the_circuit_runs_on_three_architectures(tiny_dirs, tmp_path):
    from analysis import load_model
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    for arch, folder in tiny_dirs.items():
        out = run(CircuitSpec(model=str(folder), n_pairs=3, metric="logit_diff", ig_steps=2, n_points=4), store=store)
        t = out.result.table
        g = EdgeGraph.of(load_model(str(folder)).bridge)
        assert len(t) == 4 * len(g.edges), arch
        assert out.result.meta["n_patched"] == len(g.edges)
        if arch == "llama":  # grouped-query: key/value readers are the two key/value heads
            assert "a1.h1<k>" in set(t["target"]) and "a1.h3<k>" not in set(t["target"])


def test_bad_circuit_requests_get_a_message_and_store_nothing(tmp_path):
    from gguf_files import write_tiny_gguf

    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.errors import WorkbenchError
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    with pytest.raises(WorkbenchError, match="Pick at least one method"):
        run(CircuitSpec(methods=()), store=store)
    with pytest.raises(WorkbenchError, match="1,108 edges and activation patching runs on at most 100"):
        run(CircuitSpec(methods=("activation",), patch_limit=100), store=store)
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        run(CircuitSpec(dataset="", pairs="[{"), store=store)
    mamba = write_tiny_gguf("mamba", tmp_path)
    with pytest.raises(WorkbenchError, match="mamba model.*needs attention in every block"):
        run(CircuitSpec(model=str(mamba), n_pairs=2), store=store)
    assert store.count("runs") == 0
    # with a gradient method beside it, activation patching runs on the largest edges only
    out = run(CircuitSpec(methods=("activation", "eap"), patch_limit=100, n_pairs=4, n_points=3), store=store)
    t = out.result.table
    assert out.result.meta["n_patched"] == 100 and t[t["method"] == "activation"]["score"].notna().sum() == 100
    eap = t[t["method"] == "eap"].set_index(["source", "target"])["score"]
    patched = t[(t["method"] == "activation") & t["score"].notna()].set_index(["source", "target"]).index
    assert eap.abs().loc[patched].min() >= eap.abs().drop(patched).max()  # the 100 largest by EAP


def test_component_circuits_with_mean_ablation(tmp_path):
    """edge_ablation="mean": the curves' ends are the all-mean run (0, another baseline than the corrupted run)
    and the clean run (1), the edge scores are the same, the result says what was ablated; the default stays the corrupted run (its key unchanged, test_contract's KEYS), and a length with a
    single pair is refused (it has no other pairs to average)."""
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.errors import WorkbenchError
    from analysis.runner import run
    from analysis.store import Store

    store = Store(tmp_path / "s.duckdb")
    spec = CircuitSpec(methods=("eap",), n_pairs=4, n_points=3)
    mean = run(spec.replace(edge_ablation="mean"), store=store).result
    corrupted = run(spec, store=store).result
    assert "mean over the other pairs' clean prompts" in mean.meta["statistics"]
    assert "corrupted run" in corrupted.meta["statistics"]
    f = mean.extra["faithfulness"].sort_values("n_edges")
    empty, full = f.iloc[0], f.iloc[-1]
    assert empty.faithfulness == 0.0 and full.faithfulness == pytest.approx(1.0, abs=1e-6)
    assert full.metric == pytest.approx(mean.meta["clean_metric"], abs=1e-4)
    other_empty = corrupted.extra["faithfulness"].sort_values("n_edges").iloc[0].metric
    assert abs(empty.metric - other_empty) > 1e-3  # a different baseline from the corrupted run's
    assert (mean.table["score"].to_numpy() == corrupted.table["score"].to_numpy()).all()  # the scores are the same
    # the feature level's fields do not reach a component circuit's key (no folder is read at this level)
    assert run(spec.replace(ablation="corrupted", sae_folders=("/not/read",)), store=store).hit
    from analysis.analyses.patching.page import EXAMPLE_PAIRS

    with pytest.raises(WorkbenchError, match="single pair"):
        run(CircuitSpec(dataset="", pairs=EXAMPLE_PAIRS, methods=("eap",), edge_ablation="mean"), store=store)
    assert store.count("runs") == 2


def test_component_circuits_by_position(default_handle, tmp_path, monkeypatch):
    """positions="each": an edge per position, u@p -> d@p. Each gradient score summed over positions is the
    summed edge's; an edge into the logits at the last position patches what the summed edge patches (the logits
    read the last position only); the strongest patched edge equals a brute force on plain transformers at its
    position; a writer that does not change at p leaves its edges there at exactly 0; the curves run from 0 to 1
    on circuits pruned by position; the graph draws positions across and exports in Neuronpedia's JSON. Pairs of
    several lengths and a graph over the cap are refused."""
    import dataclasses
    import json

    import numpy as np

    from analysis.analyses.circuit import spec as circuit_spec
    from analysis.analyses.circuit.figures import (
        circuit_edges,
        component_neuronpedia_json,
        graph_figure,
        node_of_target,
        prompt_tokens,
        split_position,
    )
    from analysis.analyses.circuit.spec import CircuitSpec
    from analysis.analyses.patching.page import EXAMPLE_PAIRS
    from analysis.errors import WorkbenchError
    from analysis.runner import run
    from analysis.store import Store
    from kernels.circuits import on_paths_by_position

    store = Store(tmp_path / "s.duckdb")
    spec = CircuitSpec(n_pairs=3, n_points=4, metric="logit_diff", methods=("activation", "eap"), patch_limit=20_000)
    each = run(spec.replace(positions="each"), store=store).result
    summed = run(spec, store=store).result
    graph = EdgeGraph.of(default_handle.bridge)
    P = each.meta["n_tokens"]
    assert each.meta["n_edges"] == (len(graph.edges) - 31) * P + 31 == 17263  # the logits read the last position
    t = each.table
    assert t.groupby("method").size().to_dict() == {"activation": 17263, "eap": 17263}
    assert (t["source"].map(lambda s: split_position(s)[1]) == t["position"]).all()
    base = lambda col: t[col].map(lambda s: split_position(s)[0])  # noqa: E731
    sums = t.assign(s=base("source"), d=base("target")).groupby(["method", "s", "d"])["score"].sum()
    ref = summed.table.set_index(["method", "source", "target"])["score"]
    eap = (sums.loc["eap"] - ref.loc["eap"].reindex(sums.loc["eap"].index)).abs()
    assert eap.max() < 1e-4 * max(1.0, float(ref.loc["eap"].abs().max()))
    into_logits = t[(t["method"] == "activation") & (t["target"] == "logits")].assign(s=base("source"))
    want = ref.loc["activation"].xs("logits", level="target").reindex(into_logits["s"])
    assert np.abs(into_logits["score"].to_numpy() - want.to_numpy()).max() < 1e-4
    # positions before the first token that differs: no writer changes there, every edge's effect exactly 0
    pairs = json.loads(run(spec, store=store).spec.pairs)
    first = min(next(i for i, (a, b) in enumerate(zip(p["clean_ids"], p["corrupted_ids"])) if a != b) for p in pairs)
    act = t[t["method"] == "activation"]
    assert first > 0 and (act[act["position"] < first]["score"] == 0).all()
    assert "effect is 0 without a run" in each.meta["patched_edges"]
    # the strongest patched edge into an MLP, against one forward of plain transformers with that edge's change
    top = act[act["target"].str.startswith("m")].sort_values("score", key=abs).iloc[-1]
    (u, p), (d, _) = split_position(top.source), split_position(top.target)
    clean, corrupted, answer, wrong = (torch.tensor([q[k] for q in pairs])
                                       for k in ("clean_ids", "corrupted_ids", "answer_id", "wrong_id"))
    metric = _logit_diff(answer, wrong)
    brute = _brute_force(default_handle, graph, corrupted, clean, metric,
                         [(graph.source_index[u], graph.target_index[d])], positions=[p])
    unpatched = metric(_HF(default_handle).model(corrupted).logits[:, -1].detach())
    assert float((brute[0] - unpatched).mean()) == pytest.approx(float(top.score), abs=1e-4)
    # the curves: nothing kept is 0, every edge 1, the model without every edge 0
    f, c = each.extra["faithfulness"], each.extra["completeness"]
    for method, g in f.groupby("method"):
        g = g.sort_values("n_edges")
        assert g.iloc[0].faithfulness == 0.0 and g.iloc[-1].faithfulness == pytest.approx(1.0, abs=1e-5)
    full = c[(c["method"] == "eap") & (c["n_edges"] == 17263)].iloc[0]
    assert full.completeness == pytest.approx(0.0, abs=1e-5)
    # the drawn circuit is pruned by position: what it keeps, pruned again, is itself
    kept = circuit_edges(t, each.meta, "eap", 80)
    assert 0 < len(kept) <= 80
    mask = torch.zeros(P, *graph.mask.shape, dtype=torch.bool)
    for s, d in zip(kept["source"], kept["target"]):
        (su, sp), (dn, _) = split_position(s), split_position(d)
        mask[sp, graph.source_index[su], graph.target_index[dn]] = True
    assert torch.equal(on_paths_by_position(graph, mask), mask)
    # a curve that reaches 80% only with every edge (SmolLM2 by position: a million) opens on the most a graph draws
    from analysis.analyses.circuit.figures import MAX_DRAWN_EDGES, default_edges, figures

    whole = dataclasses.replace(each, meta={**each.meta, "edges_for_80_eap": 17263})
    assert default_edges(whole, "eap") == MAX_DRAWN_EDGES
    assert len(figures(whole)["graph"].data) <= MAX_DRAWN_EDGES + 2  # an edge a trace, the midpoints and the nodes
    fig = graph_figure(t, each.meta, "eap", 80, pinned=kept.iloc[0].source, tokens=prompt_tokens(each))
    assert "by position" in fig.layout.title.text and len(fig.layout.xaxis.ticktext) == P
    lo, hi = fig.layout.xaxis.range  # every position's column is on the axis, the first token's too
    assert lo < min(fig.layout.xaxis.tickvals) and max(fig.layout.xaxis.tickvals) < hi
    # Neuronpedia's JSON: a node per drawn (component, position), links between them summing the edges they join
    groups = [("first", [kept.iloc[0].source])]
    j = json.loads(component_neuronpedia_json(each, "eap", 80, "default", groups))
    ids = {n["node_id"] for n in j["nodes"]}
    drawn = set(kept["source"]) | {node_of_target(graph, d) for d in kept["target"]}
    assert len(ids) == len(drawn) and {n["clerp"] for n in j["nodes"] if n["feature_type"] != "logit"} == drawn - {
        "logits"}
    assert all(lk["source"] in ids and lk["target"] in ids for lk in j["links"])
    assert sum(lk["weight"] for lk in j["links"]) == pytest.approx(float(kept["score"].sum()), abs=1e-4)
    assert j["qParams"]["supernodes"][0][0] == "first" and len(j["qParams"]["supernodes"][0]) == 2
    assert {n["ctx_idx"] for n in j["nodes"]} <= set(range(P))
    # refused: pairs of several lengths, a graph over the cap; nothing stored for either
    n_runs = store.count("runs")
    two = json.dumps(json.loads(EXAMPLE_PAIRS) + [{"clean": "When Tom and Mary left, Tom waved to",
                                                   "corrupted": "When Tom and Mary left, Adam waved to",
                                                   "answer": " Mary", "wrong": " Tom"}])
    with pytest.raises(WorkbenchError, match="Edges by position name their positions, and these pairs have 2"):
        run(CircuitSpec(dataset="", pairs=two, methods=("eap",), positions="each"), store=store)
    monkeypatch.setattr(circuit_spec, "MAX_POSITIONED_EDGES", 10_000)
    with pytest.raises(WorkbenchError, match="17,263 edges at 16 positions; a circuit by position holds at most 10,000"):
        run(spec.replace(positions="each", n_pairs=2), store=store)
    assert store.count("runs") == n_runs
