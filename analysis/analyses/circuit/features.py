"""Feature circuits (level "features"): SAE features at every chosen layer's residual, with each SAE's error node,
scored as nodes and joined by edges between successive layers (Marks et al. 2024; kernels/feature_circuits.py).

    spec = CircuitSpec(level="features", methods=("activation", "eap", "eap_ig", "relp"))
    outcome = run(spec)   # table: one row per edge and method; extra["nodes"]: one row per node and method

The SAEs are the Features page's (trained here at blocks.<l>.hook_resid_post, one stored run per layer, each an
input of this run: the batch and Ray paths train them side by side). Nodes: `input@p` (the embedding at position
p), `f{l}.{i}@p` (feature i of layer l's SAE at position p), `err{l}@p` (that SAE's error at p) and `logits`.
At this level "eap" is attribution patching (AtP) of nodes and edges, "eap_ig" integrated gradients (the node's
residual on the straight line between the runs), "relp" the same gradient under the LRP rules, "activation" each
node patched alone (the ground truth for nodes). Node and edge scores are in the metric's units, patched minus
unpatched, with 95% bootstrap intervals over pairs. A node is listed where its value differs between the two runs
in some pair (every other node's effect is exactly zero under every method).

Circuits: each method's top-n nodes by |score|; faithfulness on the clean prompts with every other node at its mean
over those prompts (position by position; `ablation="corrupted"`: at its value in the pair's corrupted run),
completeness with the circuit's own nodes ablated instead. A node that no pair changes is never scored, so under
mean ablation even the circuit of every scored node can fall short of the clean run.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from kernels.attribution import LRPRules, lrp_hooks
from kernels.feature_circuits import (
    FeatureStack,
    changes,
    edges_into,
    evaluate,
    integrated_level_gradients,
    level_gradients,
    level_means,
    node_positions,
    patch_nodes,
    record,
)

from ...errors import WorkbenchError
from ...result import Result
from ...session import ModelSession
from ...stats import N_BOOT, pearson, resample_weights
from ...tokens import tokenize
from ..features.sae import SKIP_FIRST, sae_from_result
from ..patching.compute import Metric
from ..patching.spec import RELP_RULES
from .common import GRADIENT_ORDER, SHIPPED, curve_sizes, curves, mean_effects, rows_per_forward
from .spec import NODE_PREFIX, SAE_INPUT, sae_input, sae_sites


def node_names(stack: FeatureStack, k: int, nodes: np.ndarray, n_pos: int) -> list[str]:
    """`input@p`; a residual SAE's `f{l}.{i}@p` and `err{l}@p`; an attention output's `attn{l}.{i}@p` and
    `attnerr{l}@p`; an MLP output's `mlp{l}.{i}@p` and `mlperr{l}@p`."""
    if k == 0:
        return [f"input@{p}" for p in nodes]
    (kind, layer), W = stack.sites[k], stack.width(k)
    feat, err = NODE_PREFIX[kind]
    return [f"{feat}{layer}.{i % W}@{i // W}" if i < n_pos * W else f"{err}{layer}@{i - n_pos * W}" for i in nodes]


def compute_features(session: ModelSession, spec, inputs, progress) -> Result:
    pairs = json.loads(spec.pairs)
    lengths = {len(p["clean_ids"]) for p in pairs}  # one length (the spec's resolve refuses more)
    bridge, dev = session.bridge, session.device
    saes, subs = {}, {}
    sites = sae_sites(spec)
    for site in sites:
        sae, _ = sae_from_result(inputs[sae_input(site)].result)
        (saes if site[0] == "resid_post" else subs)[site[1] if site[0] == "resid_post" else site] = sae.to(
            dev).requires_grad_(False)
    stack = FeatureStack(saes, bridge.cfg.n_layers, skip_first=SKIP_FIRST, sublayer_saes=subs)
    n, P, K = len(pairs), lengths.pop(), stack.n_levels
    clean = torch.tensor([p["clean_ids"] for p in pairs], device=dev)
    corrupted = torch.tensor([p["corrupted_ids"] for p in pairs], device=dev)
    answer = torch.tensor([p["answer_id"] for p in pairs], device=dev)
    wrong = torch.tensor([p["wrong_id"] for p in pairs], device=dev)
    gradient_methods = [m for m in GRADIENT_ORDER if m in spec.methods]
    parts = len(spec.methods) + 2  # each method (the gradients, or node patching), the edges, the curves
    step = [0]

    def part(what):
        lo = step[0] / parts
        step[0] += 1
        return lambda done, total: progress(lo + (done / max(total, 1)) / parts, f"{what}: {done} of {total}")

    progress(0.0, "the clean and corrupted runs, split into features")
    with torch.no_grad():
        runs_clean, runs_corr = record(bridge, stack, clean), record(bridge, stack, corrupted)
        l_clean = runs_clean.runner.logits(runs_clean.final)
        metric = Metric(spec.metric, answer, wrong, l_clean.float().log_softmax(-1))
        clean_m = metric.raw(l_clean).float()
        corr_m = metric.raw(runs_corr.runner.logits(runs_corr.final)).float()
    base, source = (runs_corr, runs_clean) if spec.direction == "denoise" else (runs_clean, runs_corr)
    base_m, source_m = (corr_m, clean_m) if spec.direction == "denoise" else (clean_m, corr_m)
    base_p, source_p = base_m.double().cpu().numpy(), source_m.double().cpu().numpy()
    if spec.metric == "logit_diff_normalized" and abs(source_p.mean() - base_p.mean()) < 1e-6:
        raise WorkbenchError("The clean and corrupted runs give the same logit difference, so it cannot be "
                             "normalised.", hint="Pick the raw logit difference, or other pairs.")
    delta = changes(stack, base, source)
    # the nodes whose value differs in some pair, per level (every other node has no effect under any method)
    active = []
    for k in range(K):
        if k == 0:
            moved = (delta[0] != 0).any(-1).any(0)
        else:
            d_acts, d_err = delta[k]
            moved = torch.cat([(d_acts != 0).any(0).flatten(), (d_err != 0).any(-1).any(0)])
        active.append(moved.nonzero().squeeze(1).cpu())
    offsets = np.cumsum([0] + [len(a) for a in active])
    n_active = int(offsets[-1])
    if n_active == 0:
        raise WorkbenchError("The clean and corrupted prompts give the same residuals: no node changes.",
                             hint="Give pairs whose prompts differ.")

    rules = LRPRules(**{r: r in spec.relp_rules for r in RELP_RULES})
    grads: dict[str, list[torch.Tensor]] = {}
    effects: dict[str, np.ndarray] = {}  # method -> [n_active, B] node effects (patched minus unpatched)
    for method in gradient_methods:
        report = part(method.upper().replace("_", "-") + " gradients")
        if method == "eap_ig":
            grads[method] = integrated_level_gradients(bridge, stack, base, source, metric.raw, spec.ig_steps,
                                                       progress=report)
        else:
            report(0, 1)
            hooks = lrp_hooks(bridge, rules) if method == "relp" else ()
            grads[method] = level_gradients(bridge, stack, base, metric.raw, hooks)
            report(1, 1)
        effects[method] = torch.cat([stack.scores(k, delta[k], grads[method][k])[:, active[k].to(dev)].T.cpu()
                                     for k in range(K)]).double().numpy()
        session.let_others_in()
    patched_idx = np.arange(n_active)
    if "activation" in spec.methods:
        report = part("node activation patching")
        if n_active > spec.patch_limit:
            lead = np.abs(effects[gradient_methods[0]].mean(1))
            patched_idx = np.sort(np.argsort(-lead, kind="stable")[:spec.patch_limit])
        act = np.full((n_active, n), np.nan)
        done = 0
        for k in range(K):
            local = patched_idx[(patched_idx >= offsets[k]) & (patched_idx < offsets[k + 1])] - offsets[k]
            if len(local):
                def sub(d, t, done=done):
                    report(done + d, len(patched_idx))
                vals = patch_nodes(bridge, stack, base, delta, k, active[k][torch.as_tensor(local)], metric.raw,
                                   progress=sub)
                act[local + offsets[k]] = (vals.double().numpy() - base_p[None])
                done += len(local)
        effects["activation"] = act
        session.let_others_in()

    # node table
    normalized = spec.metric == "logit_diff_normalized"
    weights = resample_weights(n, seed=0)
    tokens = tokenize(session, pairs[0]["clean_ids"])
    names, levels, positions, feats = [], [], [], []
    for k in range(K):
        idx = active[k].numpy()
        names += node_names(stack, k, idx, P)
        levels += [k] * len(idx)
        pos = node_positions(stack, k, active[k], P).numpy()
        positions += pos.tolist()
        if k == 0:
            feats += [-1] * len(idx)
        else:
            W = stack.width(k)
            feats += [int(i % W) if i < P * W else -1 for i in idx]
    layer_of = np.array([la for _, la in stack.sites])[np.array(levels)]
    site_of = np.array([kind for kind, _ in stack.sites], dtype=object)[np.array(levels)]
    kind = np.where(np.array(levels) == 0, "input", np.where(np.array(feats) >= 0, "feature", "error"))
    node_rows, per_pair, means = [], [], {}
    for method in [m for m in spec.methods if m in effects]:
        mean, lo, hi = mean_effects(base_p[None] + effects[method], base_p, source_p, normalized, weights)
        means[method] = mean
        node_rows.append(pd.DataFrame({
            "method": method, "node": names, "site": site_of, "layer": layer_of, "position": positions,
            "token": [tokens["token"].iloc[p] for p in positions], "kind": kind, "feature": feats,
            "score": mean.astype(np.float32), "ci_low": lo.astype(np.float32), "ci_high": hi.astype(np.float32)}))
        ok = np.isfinite(effects[method]).all(1)
        eff = effects[method][ok] / ((source_p.mean() - base_p.mean()) if normalized else 1.0)
        per_pair.append(pd.DataFrame({"method": method, "node": np.repeat(np.array(names, dtype=object)[ok], n),
                                      "pair": np.tile(np.arange(n), int(ok.sum())),
                                      "value": eff.reshape(-1).astype(np.float32)}))
    nodes = pd.concat(node_rows, ignore_index=True)

    # edges between each gradient method's top nodes
    report = part("edges between the top nodes")
    edge_rows = []
    for mi, method in enumerate(gradient_methods):
        top = np.argsort(-np.abs(means[method]), kind="stable")[:spec.edge_nodes]
        top = top[np.abs(means[method][top]) > 0]
        chosen = [np.sort(top[(top >= offsets[k]) & (top < offsets[k + 1])] - offsets[k]) for k in range(K)]
        hooks = lrp_hooks(bridge, rules) if method == "relp" else ()
        values, srcs, dsts = [], [], []
        for k in range(1, K):
            ups = [j for j in stack.upstream(k) if len(chosen[j])]
            if not (len(chosen[k]) and ups):
                continue
            t_idx = active[k][torch.as_tensor(chosen[k])]
            s_idx = {j: active[j][torch.as_tensor(chosen[j])] for j in ups}
            got = edges_into(bridge, stack, base, delta, k, grads[method][k], t_idx.to(dev),
                             {j: v.to(dev) for j, v in s_idx.items()}, hooks)
            t_names = node_names(stack, k, t_idx.numpy(), P)
            for j, e in got.items():
                s_names = node_names(stack, j, s_idx[j].numpy(), P)
                values.append(e.reshape(-1, n).double().numpy())
                srcs += [s for s in s_names for _ in t_names]
                dsts += [t for _ in s_names for t in t_names]
            report(mi * K + k, len(gradient_methods) * K)
        last = chosen[K - 1]  # the last level's nodes reach the logits with their node effects
        if len(last):
            values.append(effects[method][last + offsets[K - 1]])
            srcs += [names[i] for i in last + offsets[K - 1]]
            dsts += ["logits"] * len(last)
        if not values:
            continue
        v = np.concatenate(values)
        moved = (v != 0).any(1)  # an edge that no pair moves is no edge (a later position into an earlier one)
        v, srcs, dsts = v[moved], [x for x, k in zip(srcs, moved) if k], [x for x, k in zip(dsts, moved) if k]
        mean, lo, hi = mean_effects(base_p[None] + v, base_p, source_p, normalized, weights)
        edge_rows.append(pd.DataFrame({"method": method, "source": srcs, "target": dsts,
                                       "score": mean.astype(np.float32), "ci_low": lo.astype(np.float32),
                                       "ci_high": hi.astype(np.float32)}))
        session.let_others_in()
    table = (pd.concat(edge_rows, ignore_index=True) if edge_rows else
             pd.DataFrame({c: pd.Series(dtype=t) for c, t in (("method", object), ("source", object),
                                                               ("target", object), ("score", np.float32),
                                                               ("ci_low", np.float32), ("ci_high", np.float32))}))

    # faithfulness over nodes: mean ablation on the clean prompts
    report = part("faithfulness curves")
    if spec.ablation == "mean":
        mean_vals = level_means(stack, runs_clean)
    else:  # the corrupted run's values, pair by pair
        mean_vals = [runs_corr.parts[0]] + [runs_corr.parts[k] for k in range(1, K)]
    sizes = curve_sizes(n_active, spec.n_points)
    circuits = [([torch.zeros(0, dtype=torch.long)] * K, False), ([torch.zeros(0, dtype=torch.long)] * K, True)]
    labels = [("", -1, "empty"), ("", -2, "full")]
    for method in means:
        ranked = np.argsort(-np.nan_to_num(np.abs(means[method]), nan=-1.0), kind="stable")
        ranked = ranked[np.isfinite(means[method][ranked])]
        for size in sizes[1:]:
            keep_ids = ranked[:size]
            keep = [active[k][torch.as_tensor(np.sort(keep_ids[(keep_ids >= offsets[k]) &
                                                                (keep_ids < offsets[k + 1])] - offsets[k]))]
                    for k in range(K)]
            circuits += [(keep, False), (keep, True)]
            labels += [(method, size, "circuit"), (method, size, "complement")]
    m = evaluate(bridge, stack, runs_clean, mean_vals, circuits, metric.raw, progress=report).double().numpy()
    faith, completeness = curves(m, labels, weights, list(means), "n_nodes", lambda method, size: {},
                                 "Every node at its ablated value gives the clean prompts' metric, so no circuit can "
                                 "recover any of it.")
    session.let_others_in()

    meta = {"level": "features", "answer_id": int(pairs[0]["answer_id"]), "n_pairs": n, "n_tokens": P,
            "metric": spec.metric, "direction": spec.direction,
            "sae_layers": list(stack.layers), "sae_width": [stack.width(k) for k in range(1, K)],
            "sae_sites": [list(site) for site in stack.sites[1:]],
            "n_nodes": n_active, "n_edges": int(len(table)),
            "clean_metric": float(clean_m.mean()), "corrupted_metric": float(corr_m.mean()),
            "full_metric": float(m[1].mean()), "empty_metric": float(m[0].mean()),
            "n_patched": len(patched_idx) if "activation" in spec.methods else 0,
            "sae_inputs": {str(layer): inputs[SAE_INPUT.format(layer)].key for layer in stack.layers}}
    if subs:  # the sublayer SAEs' runs too, by input name
        meta["sae_inputs"].update({sae_input(site): inputs[sae_input(site)].key for site in sites
                                   if site[0] != "resid_post"})
    if spec.pairs_note:
        meta["pairs_note"] = spec.pairs_note
    if "activation" in spec.methods:
        meta["patched_nodes"] = ("every node" if len(patched_idx) == n_active else
                                 f"the {len(patched_idx):,} of {n_active:,} nodes with the largest "
                                 f"{gradient_methods[0]} scores (patch_limit)")
        a = means["activation"]
        for method in gradient_methods:
            ok = np.isfinite(a)
            meta[f"pearson_{method}"] = pearson(a[ok], means[method][ok]) if ok.sum() > 2 else float("nan")
    for method in means:
        f = faith[faith["method"] == method]
        reach = f[f["faithfulness"] >= 0.8]
        meta[f"nodes_for_80_{method}"] = int(reach["n_nodes"].min()) if len(reach) else None
    renorm = ", the normalisation recomputed in each" if normalized else ""
    meta["statistics"] = (f"score: the node's or edge's effect (patched minus unpatched run), the mean over {n} "
                          f"pairs; ci_low/ci_high: 95% bootstrap interval over pairs ({N_BOOT} resamples{renorm}); "
                          f"edges between each method's top {spec.edge_nodes} nodes; faithfulness measured on the "
                          "clean prompts of the same pairs, every node outside the circuit at "
                          + ("its mean over them (position by position)" if spec.ablation == "mean" else
                             "its value in the pair's corrupted run"))
    extra = {"tokens": tokens, "nodes": nodes, "per_pair": pd.concat(per_pair, ignore_index=True),
             "faithfulness": faith, "completeness": completeness}
    return Result(table=table, meta=meta, extra=extra)


# ----------------------------------------------------------------------------------------------------------
# Work before a run
# ----------------------------------------------------------------------------------------------------------
def estimate_features(plan):
    """Memory: the three recorded runs at every level (residual, features, error), the largest phase (a backward
    with every level's gradient, a batch of node patches or circuits with each level's features).

    Work: the recorded runs and their SAE splits; per gradient method a backward (IG: `ig_steps` backwards from each
    level on); activation patching of each patched node from its level on; the edges (per level, a block's forward
    and backward for each of the method's chosen nodes there); a forward per circuit on the curves. The SAEs not
    stored yet are upstream runs, one per layer."""
    from ...estimate import Estimate, Plan, input_estimate
    from ..features.sae import estimate as sae_estimate
    from .spec import folders_by_site, sae_sites, sae_specs

    spec, s = plan.spec, plan.shape
    pairs = json.loads(spec.pairs) if spec.pairs else None
    B = len(pairs) if pairs else spec.n_pairs
    P = max((len(p.get("clean_ids", [])) for p in pairs), default=SHIPPED) if pairs else SHIPPED
    P = P or SHIPPED
    layers = spec.layers or tuple(sorted({la for kind, la in folders_by_site(spec) if kind == "resid_post"})) or tuple(
        range(s.n_layers))
    K, W, d = len(sae_sites(spec.replace(layers=layers))), spec.sae_width, s.d_model  # every SAE's site
    k_act = min(spec.sae_k, W)
    methods = list(spec.methods)
    grads = [m for m in methods if m != "activation"]
    sae_pass = 2.0 * 2 * P * d * W  # encode and decode of one row's positions
    # nodes that change: about half the positions differ after the first differing token, each with up to 2k
    # features and an error node
    nodes = K * (P / 2) * (2 * k_act + 1) + P
    per_level = B * P * (2 * d + W) * 4
    held = 3 * (K + 1) * per_level + len(grads) * (K + 1) * B * P * d * 4
    rows = min(rows_per_forward(s, P), 256)
    phases = {"gradients": s.backward_bytes(B * (min(spec.ig_steps, max(1, 64 // B)) if "eap_ig" in grads else 1), P)
              + K * B * P * W * 4 * 3,
              "patches and circuits": rows * P * (3 * W + 8 * d) * 4 + s.forward_bytes(rows, P, 1)}
    phase = max(phases, key=phases.get)
    flops = 3 * (s.forward_flops(B, P, 1) + K * B * sae_pass)
    blocks = s.calls(3)
    for m in grads:
        if m == "eap_ig":
            flops += spec.ig_steps * (K + 1) * (s.backward_flops(B, P, 1) / 2 + K / 2 * B * 3 * sae_pass)
            blocks += spec.ig_steps * (K + 1) * s.calls(3) / 2 / max(1, 64 // B)
        else:
            flops += s.backward_flops(B, P, 1)
            blocks += s.calls(3)
        flops += (K + 1) * B * P * d * W * 2  # node scores
        targets = min(spec.edge_nodes, nodes)
        flops += targets * B * (3 * s.forward_flops(1, P, 0, layers=s.n_layers / len(layers)) + 3 * sae_pass)
        blocks += K * s.calls(3, layers=s.n_layers / len(layers))
    if "activation" in methods:
        patched = min(nodes, spec.patch_limit)
        flops += patched * B * (s.forward_flops(1, P / 2, 1, layers=s.n_layers / 2) + K / 2 * sae_pass / 2)
        blocks += patched * B / rows * s.calls(1, layers=s.n_layers / 2)
    circuits = 2 + 2 * len(methods) * spec.n_points
    flops += circuits * B * (s.forward_flops(1, P, 1) + K * sae_pass)
    blocks += circuits * B / rows * s.calls(1) * 2
    upstream = []
    for name, sub in (sae_specs(spec.replace(layers=layers), {}) or {}).items():
        est = input_estimate(sae_estimate, Plan(s, sub, plan.handle, plan.dataset, plan.get_stored))
        est.input = name
        upstream.append(est)
    return Estimate(parts={"recorded runs": held, phase: phases[phase]}, flops=flops, blocks=blocks,
                    lower="methods (activation patching is the largest), layers, edge_nodes or n_pairs",
                    upstream=upstream)
