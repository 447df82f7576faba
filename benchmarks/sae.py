"""Sparse autoencoders on the default model: the Features page's SAE (a middle layer's residual) trained through
the runner, against the plain TopK recipe a notebook would write (same data, width, k, steps and learning rate,
no dead-feature handling), in one process; and feature attribution (AtP) against activation patching of every
feature that changes.

    python benchmarks/sae.py [--repeats 2]

Printed: wall time, held-out FVE, L0, dead features and CE loss recovered for each, and the ratios; then the
attribution's Pearson r and the time of one AtP pass against patching the features one by one.
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.analyses.features.attribution import FeatureAttributionSpec  # noqa: E402
from analysis.analyses.features.sae import SAESpec, corpus_split, evaluate, site_activations  # noqa: E402
from analysis.runner import run  # noqa: E402
from analysis.session import ModelSession  # noqa: E402
from analysis.store import Store  # noqa: E402
from kernels.sae import SparseAutoencoder  # noqa: E402


def plain_topk(X: torch.Tensor, width: int, k: int, steps: int, batch: int, lr: float, seed: int):
    """The textbook TopK SAE loop: tied initialisation, Adam, MSE, unit decoder rows; nothing for dead features."""
    g = torch.Generator().manual_seed(seed)
    d = X.shape[1]
    sae = SparseAutoencoder(d, width, "topk", k)
    with torch.no_grad():
        W = torch.randn(width, d, generator=g)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(X.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        x = X[torch.randint(X.shape[0], (batch,), generator=g)]
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    return sae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    handle = load_model("default")
    spec = SAESpec()
    ours, theirs = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            out = run(spec, store=Store(Path(tmp) / "s.duckdb"))  # from the page's spec: gather, train, evaluate
            ours.append((time.perf_counter() - t, out.result.meta))
        s = out.spec
        with ModelSession(handle) as session:
            train, held, _ = corpus_split(session, s)
            t = time.perf_counter()
            X, _, _ = site_activations(session, train, s.hook_name, True, s.max_tokens)
            sae = plain_topk(X, s.width, s.k, s.steps, s.batch_tokens, s.lr, s.seed)
            metrics, _ = evaluate(session, sae, s.hook_name, True, X, held)
            theirs.append((time.perf_counter() - t, metrics))
    print(f"default model, {s.hook_name}, width {s.width}, k {s.k}, {s.steps} steps of {s.batch_tokens} tokens, "
          f"{ours[0][1]['n_train_tokens']:,} training tokens; figures on {ours[0][1]['n_heldout_tokens']:,} held-out "
          "tokens")
    print(f"{'':28}{'seconds':>9}{'FVE':>8}{'L0':>6}{'dead':>7}{'CE recovered':>14}")
    for name, runs in (("workbench (AuxK, page spec)", ours), ("plain TopK loop (no AuxK)", theirs)):
        sec = statistics.median(x[0] for x in runs)
        m = runs[-1][1]
        print(f"{name:28}{sec:9.1f}{m['fve']:8.3f}{m['l0']:6.1f}{m['dead_fraction']:7.1%}"
              f"{m['ce_loss_recovered']:14.3f}")
    ratio = statistics.median(x[0] for x in ours) / statistics.median(x[0] for x in theirs)
    print(f"time ratio workbench / plain: {ratio:.2f}x (ours: the whole run, tokenising the corpus and writing the "
          "store included; plain: gathering, training, evaluation)")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s.duckdb")
        run(spec, store=store)
        t = time.perf_counter()
        att = run(FeatureAttributionSpec(n_pairs=8), store=store).result.meta
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        run(FeatureAttributionSpec(n_pairs=8, max_patched=1), store=store)
        atp_s = time.perf_counter() - t
    print(f"feature attribution, 8 IOI pairs: {att['n_nodes']:,} nodes (pair, position, feature) that change; "
          f"Pearson r with patching them: AtP {att['pearson_atp']:.3f}, RelP {att['pearson_relp']:.3f}")
    print(f"run time: every node patched {full_s:.2f} s; AtP and RelP with 1 node patched per pair {atp_s:.2f} s "
          f"({full_s / atp_s:.1f}x)")


if __name__ == "__main__":
    main()
