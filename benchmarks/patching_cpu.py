"""Activation patching sweeps: ours (kernels/patching.py) and TransformerLens 4.3's `patching`, side by side;
and RelP for every component type against one forward + backward.

    python benchmarks/patching_cpu.py [--pairs 8] [--repeats 3]

Default model, IOI pairs of one token length, logit-difference metric, clean activations patched into the
corrupted run. Both sides are warmed up once, then timed; results are checked equal (max abs difference).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's sweeps draw progress bars
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from timing import forward_backward, median_seconds  # noqa: E402
from transformer_lens import patching as tl  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.stats import N_BOOT, bootstrap_interval, resample_weights, sign_flip_p  # noqa: E402
from analysis.tasks import ioi_pairs  # noqa: E402
from kernels.attribution import LRPRules, attribution_scores  # noqa: E402
from kernels.patching import ACTIVATIONS, BlockRunner, activation_patch_sweep, source_activations  # noqa: E402

SWEEPS = {"resid_pre": tl.get_act_patch_resid_pre, "z_by_pos": tl.get_act_patch_attn_head_out_by_pos}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    handle = load_model("default")
    bridge = handle.bridge
    rows = ioi_pairs(handle).rows
    rows = [r for r in rows if len(r["clean_ids"]) == len(rows[0]["clean_ids"])][: args.pairs]
    clean = torch.tensor([r["clean_ids"] for r in rows])
    corr = torch.tensor([r["corrupted_ids"] for r in rows])
    io = torch.tensor([r["io_id"] for r in rows])
    s = torch.tensor([r["s_id"] for r in rows])
    B = len(rows)

    def ld_batch(logits):  # TransformerLens: full logits [B, P, V] -> scalar
        last = logits[:, -1]
        return (last.gather(1, io[:, None]) - last.gather(1, s[:, None])).mean()

    def ld_rows(logits):  # ours: final-position logits [rows, V] -> [rows]
        n = logits.shape[0] // B
        return (logits.gather(1, io.repeat(n)[:, None]) - logits.gather(1, s.repeat(n)[:, None]))[:, 0]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"default model ({handle.summary.n_layers} layers, {handle.summary.n_heads} heads), {B} IOI pairs of "
          f"{clean.shape[1]} tokens, logit difference, clean -> corrupted")
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
    for name, tl_fn in SWEEPS.items():
        source = source_activations(bridge, clean, name)  # like TransformerLens's clean cache: given

        def ours():
            runner = BlockRunner(bridge, corr)  # one forward of the corrupted run, then the sweep
            return activation_patch_sweep(runner, source, name, ld_rows, source_tokens=clean).values.mean(-1)

        def theirs():
            with torch.no_grad():
                return tl_fn(bridge, corr, clean_cache, ld_batch)

        times, results = {}, {}
        for label, fn in (("ours", ours), ("TransformerLens", theirs)):
            times[label], _, results[label] = median_seconds(fn, args.repeats)
        diff = (results["ours"] - results["TransformerLens"]).abs().max().item()
        n = results["ours"].numel()
        print(f"{name:10s} {n:5d} patches: ours {times['ours']:.3f} s, TransformerLens {times['TransformerLens']:.3f} s"
              f" -> {times['TransformerLens'] / times['ours']:.1f}x faster; max abs diff {diff:.1e}")
        per_pair = activation_patch_sweep(BlockRunner(bridge, corr), source, name, ld_rows,
                                          source_tokens=clean).values.detach().double().reshape(-1, B).numpy()
        base = ld_rows(BlockRunner(bridge, corr).final_logits).detach().double().numpy()

        def statistics():  # what the patching analysis adds per sweep (issue 15): intervals and p-values
            low, high = bootstrap_interval(per_pair, resample_weights(B))
            return low, high, sign_flip_p(per_pair - base[None, :])

        t_stats = median_seconds(statistics, args.repeats)[0]
        print(f"{'':10s} + 95% bootstrap intervals ({N_BOOT} resamples) and sign-flip p-values (2^{B} patterns): "
              f"{t_stats:.3f} s = {100 * t_stats / times['ours']:.0f}% of our sweep")

    # RelP for all component types at once vs one plain forward + backward
    comps = [a for a in ACTIVATIONS if a.endswith(("_by_pos",)) or a in ("resid_pre", "resid_post", "attn_out",
                                                                           "mlp_out")]
    src = {}
    for a in comps:
        src.update(source_activations(bridge, clean, a))

    def relp():
        return attribution_scores(bridge, corr, src, comps, lambda lg: ld_rows(lg).mean(), LRPRules())

    def fwd_bwd():
        forward_backward(bridge, corr, ld_rows)

    t = {label: median_seconds(fn, args.repeats)[0] for label, fn in (("relp", relp), ("fwd+bwd", fwd_bwd))}
    print(f"RelP, all {len(comps)} component types ({', '.join(comps)}): {t['relp']:.3f} s = "
          f"{t['relp'] / t['fwd+bwd']:.1f}x one forward + backward ({t['fwd+bwd']:.3f} s)")


if __name__ == "__main__":
    main()
