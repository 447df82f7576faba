"""Circuits: which edges between components carry a behaviour, and how few of them still do the task.

    spec = CircuitSpec(dataset="ioi", n_pairs=8, methods=("activation", "eap", "eap_ig", "relp"))
    outcome = run(spec)   # table: method, source, target, score, ci_low, ci_high (one row per edge and method)

Edges are those of the EAP-IG library's residual-stream graph (kernels/circuits.py). Scores, in the metric's units
(normalised: 0 at the unpatched run, 1 at the other run), are the edge's effect, patched minus unpatched:
activation patching of that edge alone (the ground truth: the reader gets the writer's other-run output, everything
after it recomputed), EAP (the writer's change times the gradient at the reader's input), EAP-IG (the same with the
gradient averaged over `ig_steps` points between the two runs' inputs) and RelP (the gradient under LRP rules).

Each gradient method's circuits: its top-n edges by |score|, kept only where they lie on a path from the input to
the logits; every other edge carries the corrupted run's writer output into its reader (on the clean prompts), or
with `edge_ablation="mean"` the writer's mean over the other pairs' clean prompts (held out, position by position).
faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty)), completeness the same of the model with the circuit
removed; a curve over n per method (`extra["faithfulness"]`).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from kernels.attribution import LRPRules
from kernels.circuits import (
    EdgeGraph,
    check_additive,
    edge_hooks,
    edge_patch,
    edge_scores_from,
    evaluate_circuits,
    integrated_reader_gradients,
    on_paths,
    on_paths_by_position,
    positioned_edges,
    reader_gradients,
    record,
)
from kernels.patching import BlockRunner

from ...errors import WorkbenchError
from ...estimate import ENTRY_FLOPS, Estimate
from ...result import Result
from ...session import ModelSession
from ...stats import CHUNK_ELEMENTS, N_BOOT, pearson, resample_weights
from ...tokens import tokenize
from ..patching.compute import Metric, length_groups
from ..patching.spec import RELP_RULES
from .common import GRADIENT_ORDER, SHIPPED, curve_sizes, curves, mean_effects, rows_per_forward
from .spec import CircuitSpec

ABLATED = {"corrupted": "its writer's output in the pair's corrupted run",
           "mean": "its writer's mean over the other pairs' clean prompts of the same length, position by position"}
PER_PAIR_ROWS = 1_000_000  # per-pair rows kept (all edges on small graphs, each method's top edges on large ones)


class _Group:
    """One length group of pairs: its runs, writers' outputs and metrics."""

    def __init__(self, session: ModelSession, spec: CircuitSpec, graph: EdgeGraph, pairs: list[dict]):
        dev = session.device
        bridge = session.bridge
        self.clean = torch.tensor([p["clean_ids"] for p in pairs], device=dev)
        self.corrupted = torch.tensor([p["corrupted_ids"] for p in pairs], device=dev)
        answer = torch.tensor([p["answer_id"] for p in pairs], device=dev)
        wrong = torch.tensor([p["wrong_id"] for p in pairs], device=dev)
        self.n = len(pairs)
        w_clean, r_clean, l_clean = record(bridge, graph, self.clean)
        w_corr, r_corr, l_corr = record(bridge, graph, self.corrupted)
        check_additive(graph, w_clean, r_clean)
        self.metric = Metric(spec.metric, answer, wrong, l_clean.float().log_softmax(-1))
        self.clean_m, self.corrupted_m = self.metric.raw(l_clean).float(), self.metric.raw(l_corr).float()
        if spec.edge_ablation == "mean":  # each pair's writers at their mean over the other pairs' clean prompts
            self.ablated = (w_clean.sum(0, keepdim=True) - w_clean) / (self.n - 1)
        else:
            self.ablated = w_corr
        if spec.direction == "denoise":
            self.base_tokens, self.w_base, self.w_source, self.r_base = self.corrupted, w_corr, w_clean, r_corr
            self.base_m, self.source_m = self.corrupted_m, self.clean_m
        else:
            self.base_tokens, self.w_base, self.w_source, self.r_base = self.clean, w_clean, w_corr, r_clean
            self.base_m, self.source_m = self.clean_m, self.corrupted_m
        self.delta = self.w_source - self.w_base


def _let_others_in(session: ModelSession) -> None:
    """Between parts a waiting run may go first, on the model as every analysis sees it (the edge hooks off)."""
    with edge_hooks(session.bridge, on=False):
        session.let_others_in()


def compute(session: ModelSession, spec: CircuitSpec, inputs, progress) -> Result:
    if spec.level == "features":
        from .features import compute_features

        return compute_features(session, spec, inputs, progress)
    pairs = json.loads(spec.pairs)
    groups = length_groups(pairs)
    bridge = session.bridge
    graph = EdgeGraph.of(bridge)
    n = len(pairs)
    gradient_methods = [m for m in GRADIENT_ORDER if m in spec.methods]
    parts = len(spec.methods) + 1  # a share of the bar per method and the faithfulness curves
    with edge_hooks(bridge):
        progress(0.0, "the clean and corrupted runs")
        try:
            built = [(idx, _Group(session, spec, graph, [pairs[i] for i in idx])) for idx in groups.values()]
        except ValueError as e:  # a model whose heads' results do not add up to the attention's output
            raise WorkbenchError(f"{session.name}: {e}; its edges cannot be read from the residual stream.") from e
        base_p = torch.cat([g.base_m for _, g in built]).double().cpu().numpy()
        source_p = torch.cat([g.source_m for _, g in built]).double().cpu().numpy()
        order = [i for idx, _ in built for i in idx]
        if spec.metric == "logit_diff_normalized" and abs(source_p.mean() - base_p.mean()) < 1e-6:
            raise WorkbenchError("The clean and corrupted runs give the same logit difference, so it cannot be "
                                 "normalised.", hint="Pick the raw logit difference, or other pairs.")
        # per method the estimated (or measured) metric of each edge's patched run: [n_edges, N]
        patched: dict[str, np.ndarray] = {}
        step = 0

        def part(what):
            nonlocal step
            lo = step / parts
            step += 1
            return lambda done, total: progress(lo + (done / max(total, 1)) / parts, f"{what}: {done} of {total}")

        each = spec.positions == "each"  # edges u@p -> d@p (pairs of one length: one group)
        n_pos = built[0][1].base_tokens.shape[1]
        pe = positioned_edges(graph, n_pos) if each else torch.tensor([(0, u, d) for u, d in graph.edges])
        e_p, e_u, e_d = pe.T
        for method in gradient_methods:
            report = part(method.upper().replace("_", "-"))
            cols = []
            for _, g in built:
                rules = LRPRules(**{r: r in spec.relp_rules for r in RELP_RULES}) if method == "relp" else None
                if method == "eap_ig":
                    grads = integrated_reader_gradients(bridge, graph, g.base_tokens, g.w_base[:, :, 0],
                                                        g.w_source[:, :, 0], g.metric.raw, spec.ig_steps,
                                                        progress=report)
                else:
                    report(0, 1)
                    grads = reader_gradients(bridge, graph, g.base_tokens, g.metric.raw, rules=rules)
                    report(1, 1)
                scores = edge_scores_from(graph, g.delta, grads, per_position=each)  # [B, (S,) n_sources, n_targets]
                picked = scores[:, e_p, e_u, e_d] if each else scores[:, e_u, e_d]
                cols.append((g.base_m[:, None] + picked).T)  # [E, B] estimated patched metric
                _let_others_in(session)
            patched[method] = torch.cat(cols, 1).double().cpu().numpy()
        chosen = list(range(len(pe)))
        unmoved = 0
        if "activation" in spec.methods:
            report = part("edge activation patching")
            if len(chosen) > spec.patch_limit:  # the largest edges by the first gradient method
                lead = patched[gradient_methods[0]]
                effect = np.abs(lead.mean(1) - base_p.mean())
                chosen = sorted(np.argsort(-effect, kind="stable")[:spec.patch_limit].tolist())
            act = np.full((len(pe), n), np.nan)
            run_on = chosen
            if each:  # a writer that does not change at p: its edges there change nothing (their runs are the base)
                moved = (built[0][1].delta != 0).any(-1).any(0).cpu()[e_p, e_u]  # [E]
                run_on = [i for i in chosen if bool(moved[i])]
                unmoved = len(chosen) - len(run_on)
                act[[i for i in chosen if not bool(moved[i])]] = base_p[None]
            cols = []
            for _, g in built:
                runner = BlockRunner(bridge, g.base_tokens)
                cols.append(edge_patch(bridge, graph, runner, g.r_base[:, :, -1], g.delta,
                                       [(int(e_u[i]), int(e_d[i])) for i in run_on], g.metric.raw, progress=report,
                                       positions=[int(e_p[i]) for i in run_on] if each else None))
                _let_others_in(session)
            if run_on:
                act[run_on] = torch.cat(cols, 1).double().cpu().numpy()
            patched["activation"] = act
        weights = resample_weights(n, seed=0)
        src, dst = edge_names(graph, pe, each)
        table, per_pair = _edge_table(src, dst, spec, patched, base_p, source_p, weights, order)
        if each:
            table.insert(3, "position", np.tile(e_p.numpy(), len(table) // len(pe)).astype(np.int32))
        report = part("faithfulness curves")
        faith, completeness = _faithfulness(session, spec, graph, pe, each, built, patched, base_p, weights, report)
    longest = pairs[groups[max(groups)][0]]
    meta = {"n_pairs": n, "n_tokens": max(groups), "metric": spec.metric, "direction": spec.direction,
            "n_edges": len(pe), "n_sources": len(graph.sources), "n_targets": len(graph.targets),
            "positions": spec.positions,
            "clean_metric": float(np.mean(torch.cat([g.clean_m for _, g in built]).cpu().numpy())),
            "corrupted_metric": float(np.mean(torch.cat([g.corrupted_m for _, g in built]).cpu().numpy())),
            "n_patched": len(chosen) if "activation" in spec.methods else 0,
            "graph": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_kv_heads": graph.n_kv_heads,
                      "parallel_attn_mlp": graph.parallel}}
    if each:
        meta["n_graph_edges"] = len(graph.edges)
    if len(groups) > 1:
        meta["length_groups"] = {str(length): len(idx) for length, idx in groups.items()}
    if spec.pairs_note:
        meta["pairs_note"] = spec.pairs_note
    if "activation" in spec.methods:
        meta["patched_edges"] = ("every edge" if len(chosen) == len(pe) else
                                 f"the {len(chosen):,} of {len(pe):,} edges with the largest "
                                 f"{gradient_methods[0]} scores (patch_limit)")
        if unmoved:
            meta["patched_edges"] += (f"; {unmoved:,} of them leave a writer at a position where it does not change "
                                      "between the two runs: their effect is 0 without a run")
        for m in gradient_methods:
            t = table[table["method"] == m].set_index(["source", "target"])["score"]
            a = table[table["method"] == "activation"].dropna(subset=["score"]).set_index(["source", "target"])["score"]
            both = pd.concat([a.rename("a"), t.rename("m")], axis=1, join="inner")
            meta[f"pearson_{m}"] = pearson(both["a"], both["m"]) if len(both) > 2 else float("nan")
    for m in patched:
        f = faith[faith["method"] == m]
        reach = f[f["faithfulness"] >= 0.8]
        meta[f"edges_for_80_{m}"] = int(reach["n_edges"].min()) if len(reach) else None
    renorm = ", the normalisation recomputed in each" if spec.metric == "logit_diff_normalized" else ""
    meta["statistics"] = (f"score: the edge's effect (patched minus unpatched run), the mean over {n} pairs; "
                          f"ci_low/ci_high: 95% bootstrap interval over pairs ({N_BOOT} resamples{renorm}"
                          "); faithfulness measured on the clean prompts of the same pairs, every edge outside the "
                          "circuit given " + ABLATED[spec.edge_ablation])
    extra = {"tokens": tokenize(session, longest["clean_ids"]), "per_pair": per_pair, "faithfulness": faith,
             "completeness": completeness}
    return Result(table=table, meta=meta, extra=extra)


def edge_names(graph: EdgeGraph, pe: torch.Tensor, each: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each edge's source and target names: the EAP-IG library's, and by position `a3.h1@5` -> `m4@5` (the logits,
    read at the last position only, plain `logits`)."""
    src = np.array(graph.sources, dtype=object)[pe[:, 1].numpy()]
    dst = np.array(graph.targets, dtype=object)[pe[:, 2].numpy()]
    if each:
        at = np.char.add("@", pe[:, 0].numpy().astype(str)).astype(object)
        src = src + at
        dst = np.where(dst == "logits", dst, dst + at)
    return src, dst


def moved_share(pairs: list[dict] | None, n_pos: int) -> float:
    """The share of positions at which the writers can change between a pair's two runs: from the first position
    where any pair's prompts differ (attention carries a change forward, never back); 1 without pairs."""
    if not pairs:
        return 1.0
    first = n_pos
    for p in pairs:
        diff = [i for i, (a, b) in enumerate(zip(p["clean_ids"], p["corrupted_ids"])) if a != b]
        first = min(first, diff[0] if diff else n_pos)
    return max(n_pos - first, 1) / n_pos


def _edge_table(src: np.ndarray, dst: np.ndarray, spec: CircuitSpec, patched: dict[str, np.ndarray],
                base: np.ndarray, source: np.ndarray, weights: np.ndarray,
                order: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    normalized = spec.metric == "logit_diff_normalized"
    rows, per_pair = [], []
    n = len(base)
    keep_per_method = max(1, PER_PAIR_ROWS // max(1, n * len(patched)))
    span = source.mean() - base.mean()
    for method in [m for m in spec.methods if m in patched]:
        values = patched[method]
        mean, lo, hi = mean_effects(values, base, source, normalized, weights)
        rows.append(pd.DataFrame({"method": method, "source": src, "target": dst, "score": mean.astype(np.float32),
                                  "ci_low": lo.astype(np.float32), "ci_high": hi.astype(np.float32)}))
        top = np.argsort(-np.nan_to_num(np.abs(mean), nan=-1), kind="stable")[:keep_per_method]
        top = top[np.isfinite(mean[top])]
        eff = values[top] - base[None]
        if normalized:
            eff = eff / span
        per_pair.append(pd.DataFrame({"method": method, "source": np.repeat(src[top], n),
                                      "target": np.repeat(dst[top], n), "pair": np.tile(np.asarray(order), len(top)),
                                      "value": eff.reshape(-1).astype(np.float32)}))
    return pd.concat(rows, ignore_index=True), pd.concat(per_pair, ignore_index=True)


def _faithfulness(session, spec: CircuitSpec, graph: EdgeGraph, pe: torch.Tensor, each: bool, built,
                  patched: dict[str, np.ndarray], base: np.ndarray, weights: np.ndarray,
                  report) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per method and circuit size: the circuit's faithfulness and the completeness of the model without it, each
    with a bootstrap interval over pairs; the empty and the full circuit measured the same way. `pe`: the edges
    (position, source, target) in the table's order; `each`: a circuit keeps edges at their positions
    ([S, n_sources, n_targets] masks), else at every position."""
    methods = [m for m in spec.methods if m in patched]
    if each:
        full, index = graph.positioned(built[0][1].base_tokens.shape[1]), pe.T
    else:
        full, index = graph.mask.clone(), pe[:, 1:].T
    sizes = curve_sizes(index.shape[1], spec.n_points)
    circuits, labels = [torch.zeros_like(full), full], [("", -1, "empty"), ("", -2, "full")]
    mean_abs = {m: np.nan_to_num(np.abs(patched[m].mean(1) - base.mean()), nan=-1.0) for m in methods}
    kept_counts = {}
    for m in methods:
        ranked = np.argsort(-mean_abs[m], kind="stable")
        for size in sizes[1:]:
            keep = torch.zeros_like(full)
            top = [int(i) for i in ranked[:size] if mean_abs[m][i] >= 0]
            if top:
                keep[tuple(index[:, top])] = True
            keep = on_paths_by_position(graph, keep) if each else on_paths(graph, keep)
            kept_counts[m, size] = int(keep.sum())
            circuits += [keep, full & ~keep]
            labels += [(m, size, "circuit"), (m, size, "complement")]
    keep = torch.stack(circuits)
    values = []
    for i, (_, g) in enumerate(built):
        def sub(done, total, i=i):
            report(i * total + done, total * len(built))
        values.append(evaluate_circuits(session.bridge, graph, g.clean, g.ablated, keep, g.metric.raw,
                                        progress=sub))
        _let_others_in(session)
    m = torch.cat(values, 1).double().cpu().numpy()  # [K, N]
    return curves(m, labels, weights, methods, "n_edges", lambda method, size: {"n_edges_kept": kept_counts.get(
        (method, size), 0)}, "The clean and corrupted runs give the same metric, so no circuit can recover any of "
        "the difference.")


# ----------------------------------------------------------------------------------------------------------
# Work before a run
# ----------------------------------------------------------------------------------------------------------
def estimate(plan) -> Estimate:
    """Memory: what the run holds throughout (both runs' writer outputs, the base run's reader inputs, the
    writers' changes, the block runner's recorded inputs) and the largest of its phases: the gradients (a
    [pairs, positions, readers, width] stack and the backward), the edge-patch forwards and the circuit forwards
    (rows sized to a fixed budget, kernels.circuits.ROW_BUDGET), the bootstrap (a chunk of resampled means) and the
    tables.

    Work: recorded runs, one forward and backward per gradient method (EAP-IG: per step), activation patching of
    each patched edge from its reader's layer on, and a forward per circuit on the curves (two per size and
    method: the circuit and its complement)."""
    from kernels.circuits import ROW_BUDGET, circuit_row_bytes, split_row_bytes

    spec, s = plan.spec, plan.shape
    if spec.level == "features":
        from .features import estimate_features

        return estimate_features(plan)
    pairs = json.loads(spec.pairs) if spec.pairs else None
    B = len(pairs) if pairs else spec.n_pairs
    P = max((len(p.get("clean_ids", [])) for p in pairs), default=SHIPPED) if pairs else SHIPPED
    P = P or SHIPPED
    graph = EdgeGraph(s.n_layers, s.n_heads, s.n_kv_heads, s.parallel)
    each = spec.positions == "each"
    n_src, n_dst = len(graph.sources), len(graph.targets)
    n_edges = len(positioned_edges(graph, P)) if each else len(graph.edges)
    per_score = P if each else 1  # a score per position
    methods = [m for m in spec.methods]
    per_pos = B * P * s.d_model * 4
    copies = 4 if spec.edge_ablation == "mean" else 3  # writers: both runs, the changes (and the held-out means)
    held = per_pos * (copies * n_src + n_dst) + 2 * s.resid_bytes(B, P, s.n_layers + 1)
    split = split_row_bytes(graph, s.d_model, P)
    phases = {"tables": 0}
    if any(m != "activation" for m in methods):
        rows = B * min(spec.ig_steps, max(1, 64 // B)) if "eap_ig" in methods else B
        phases["gradients"] = (3 * per_pos * n_dst + s.backward_bytes(rows, P) + rows * s.n_layers * split // 2
                               + B * per_score * n_src * n_dst * 4 * 3)
    chunk_rows = rows_per_forward(s, P)
    if "activation" in methods:
        rows = min(min(chunk_rows, ROW_BUDGET // split), B * min(n_edges, spec.patch_limit))
        phases["edge patches"] = rows * (split + 4 * P * (6 * s.d_model + 2 * s.d_mlp)) + s.logits_bytes(rows, 1, 2)
    circuits = 2 + 2 * len(methods) * spec.n_points
    per_row = circuit_row_bytes(graph, s.d_model, P)
    rows = max(B, min(min(chunk_rows, ROW_BUDGET // per_row) // B * B, circuits * B))
    phases["circuit forwards"] = rows * (per_row + 4 * P * (6 * s.d_model + 2 * s.d_mlp)) + s.logits_bytes(rows, 1, 2)
    phases["circuit forwards"] += circuits * per_score * n_src * n_dst  # the circuits' masks
    boot = min(n_edges, max(1, CHUNK_ELEMENTS // N_BOOT)) * N_BOOT * 8
    kept = min(n_edges * len(methods) * B, 1_000_000)
    phases["tables"] = 3 * boot + n_edges * len(methods) * 64 + kept * 40
    phase = max(phases, key=phases.get)
    flops = 2 * s.forward_flops(B, P)
    blocks = s.calls(2)
    split_flops = split / 4 * ENTRY_FLOPS / 8  # the per-head copies of each block's input
    for m in methods:
        if m == "activation":
            # by position: a writer that does not change at p needs no run there
            patchedges = min(n_edges, spec.patch_limit) * (moved_share(pairs, P) if each else 1.0)
            layers = s.n_layers / 3  # an edge's reader sits, on average, a third of the way down its run
            flops += patchedges * B * (layers * (2.0 * s.block_params * P + split_flops) + s.vocab_flops(1))
            blocks += patchedges * B * layers / 64  # rows per forward on the CPU
        elif m == "eap_ig":
            flops += spec.ig_steps * s.backward_flops(B, P)
            blocks += spec.ig_steps * s.calls(3)
        else:
            flops += s.backward_flops(B, P)
            blocks += s.calls(3)
        flops += 2.0 * B * P * n_src * n_dst * s.d_model  # scores: changes times gradients (summed or not)
    flops += circuits * s.forward_flops(B, P) * 1.5  # replacing writers at every reader
    blocks += circuits * s.calls(1)
    return Estimate(parts={"recorded runs": held, phase: phases[phase]}, flops=flops, blocks=blocks,
                    lower="methods (activation patching is the largest), n_pairs, n_points or patch_limit")


