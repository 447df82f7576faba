"""The bit allocation at several budgets, before and after issue 26, against every single format that fits.

    python benchmarks/quant_allocation.py                       # the default model, its page's settings
    python benchmarks/quant_allocation.py --n-seqs 8 --seq-len 32 --max-samples 12 --budgets 3,4,4.5

Before (allocation version 2): Tr(H)/n at its Hutchinson mean, a negative mean counted as zero, and the lowest
total Omega under the budget taken as it is. After (version 3): the upper end of each trace's 95% interval,
candidates (lowest Omega with every format and without the fewest-bit ones, each format alone) measured on the
traces' text and the lowest KL that fits chosen. Both picks and every format alone are measured here, in this
process, on the traces' text (where the new allocation chooses) and on held-out text (the allocation's own,
sampled with another seed), as mean per-token KL(full || quantized).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis.analyses.quant.compute import (  # noqa: E402
    Damage,
    QuantAllocationSpec,
    QuantRunner,
    monotone_assignments,
    traces_text,
    weight_units,
)
from analysis.models import load_model  # noqa: E402
from analysis.runner import run  # noqa: E402
from analysis.session import ModelSession  # noqa: E402
from analysis.store import Store  # noqa: E402
from kernels.quant import parse_format, sq_error  # noqa: E402


def version2_pick(units, traces, fmts, budget) -> dict[str, str]:
    """The allocation as version 2 made it: mean traces, negative ones as zero, the lowest Omega that fits."""
    tpp = np.array([max(float(traces.loc[u.name, "trace_per_param"]), 0.0) for u in units])
    order = np.argsort(-tpp, kind="stable")
    units, tpp = [units[i] for i in order], tpp[order]
    n = np.array([u.n for u in units], dtype=np.float64)
    with torch.no_grad():
        omega = tpp[:, None] * np.array([[sq_error(u.weight, f, u.out_dim) for f in fmts] for u in units])
    bits = np.array([[f.bits_per_weight(tuple(u.weight.shape) if u.out_dim == 0 else tuple(u.weight.shape[::-1]))
                      for f in fmts] for u in units])
    bounds = monotone_assignments(len(units), len(fmts))
    k = np.arange(len(fmts))
    cum_o = np.vstack([np.zeros(len(fmts)), np.cumsum(omega, 0)])
    cum_b = np.vstack([np.zeros(len(fmts)), np.cumsum(bits * n[:, None], 0)])
    total = (cum_o[bounds[:, 1:], k] - cum_o[bounds[:, :-1], k]).sum(1)
    avg = (cum_b[bounds[:, 1:], k] - cum_b[bounds[:, :-1], k]).sum(1) / n.sum()
    within = np.flatnonzero(avg <= budget + 1e-9)
    pick = within[np.argmin(total[within])]
    return {u.name: fmts[j].name for u, j in zip(units, np.repeat(k, np.diff(bounds[pick])))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-samples", type=int, default=100)
    ap.add_argument("--budgets", default="3,4,4.5,5,6")
    ap.add_argument("--store", default="", help="a store to reuse (default: a fresh one)")
    args = ap.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; model {args.model}, {args.n_seqs} x {args.seq_len} tokens, at most {args.max_samples} "
          "Hutchinson samples")
    store = Store(Path(args.store) if args.store else Path(tempfile.mkdtemp()) / "s.duckdb")
    handle = load_model(args.model)
    fields = dict(model=args.model, n_seqs=args.n_seqs, seq_len=args.seq_len, max_samples=args.max_samples)
    print("| budget | assignment | bits/weight | KL, traces' text | KL, held-out text |")
    print("|---|---|---|---|---|")
    for budget in [float(b) for b in args.budgets.split(",")]:
        t0 = time.perf_counter()
        out = run(QuantAllocationSpec(budget_bits=budget, **fields), store=store)
        took = time.perf_counter() - t0
        res = out.result
        traces_run = store.get(res.meta["traces_run"])
        fmts = sorted((parse_format(f) for f in res.meta["formats"]), key=lambda f: -f.bits)
        held = res.extra["held_out_tokens"]
        with ModelSession(handle) as s:
            units = weight_units(s)
            old = version2_pick(units, traces_run.table.set_index("unit"), fmts, budget)
            n = np.array([u.n for u in units], dtype=np.float64)
            shape = {u.name: tuple(u.weight.shape) if u.out_dim == 0 else tuple(u.weight.shape[::-1]) for u in units}
            old_bits = sum(parse_format(old[u.name]).bits_per_weight(shape[u.name]) * u.n for u in units) / n.sum()
            texts = {"traces": traces_text(s, _Outcome(traces_run)),
                     "held_out": torch.tensor(held["token_id"].to_numpy(), device=s.device).reshape(
                         int(held["seq"].max()) + 1, -1)}
            kl = {}
            for name, tokens in texts.items():
                qr = QuantRunner(s, tokens)
                damage = Damage(tokens, qr.full_logits)
                kl[name] = damage(qr.logits(units, {i: old[u.name] for i, u in enumerate(units)}))["kl"]
        m = res.extra["measured"]
        rows = [("before (version 2's pick)", old_bits, kl["traces"], kl["held_out"])]
        chosen = m[m["chosen"]].iloc[0]
        rows.append((f"after: {chosen['assignment']}", chosen["avg_bits"], chosen["kl_calibration"],
                     chosen["kl_held_out"]))
        for r in m[m["assignment"].str.startswith("all ") & m["fits_budget"]].itertuples():
            rows.append((r.assignment, r.avg_bits, r.kl_calibration, r.kl_held_out))
        for label, bits, a, b in rows:
            print(f"| {budget:g} | {label} | {bits:.3f} | {a:.4g} | {b:.4g} |")
        print(f"<!-- budget {budget:g}: allocation {took:.1f} s -->", flush=True)


class _Outcome:
    """traces_text reads a run outcome's `.result`."""

    def __init__(self, result):
        self.result = result


if __name__ == "__main__":
    main()
