"""How a run's progress moves: every analysis on the default model, at its page's defaults, in one fresh store.

    python benchmarks/progress.py [--only patching,lens] [--model default] [--sae small|default] [--top 3]

Per analysis in registry order: its inputs are run and stored first, then the run itself goes through
`analysis.runner.run` with a progress callback that records (time, frac, what). Only the reports the analysis's
own compute makes count (the runner's `compute_run` for that analysis is watched; the inputs' runs and the
store's hits before it are left out), with the compute's start and end as the first and last points, so a
compute that reports nothing has one gap as long as itself.

Printed per analysis: the compute's seconds, how many reports it made, the longest gap between two points
(seconds and as a fraction of the compute), the `what` just before that gap, and whether `frac` ever went
backwards. A gap over 3 s and over 15 % of the run is a bar that sits still where a person waits: `slow` marks it.

The SAE-based analyses use a small SAE (width 64, k 4, 300 steps) unless `--sae default` (the Features page's SAE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from analysis import load_model, runner  # noqa: E402
from analysis.registry import ANALYSES, get_analysis  # noqa: E402
from analysis.runner import resolve_inputs, resolve_tokens, run  # noqa: E402
from analysis.store import Store  # noqa: E402

SMALL_SAE = {"width": 64, "k": 4, "steps": 300}
SAE_BASED = ("sae", "sae_features", "sae_encode", "sae_attribution", "sae_steer", "sae_names")
SLOW_S, SLOW_FRAC = 3.0, 0.15


@dataclass
class Trace:
    """The reports one run made, and when the compute of `analysis` (not its inputs') started and ended."""

    analysis: str
    t0: float = field(default_factory=time.perf_counter)
    reports: list[tuple[float, float, str]] = field(default_factory=list)  # (seconds since t0, frac, what)
    start: float | None = None
    end: float | None = None
    inside: bool = False

    def __call__(self, frac: float, what: str) -> None:
        if self.inside:
            self.reports.append((time.perf_counter() - self.t0, float(frac), str(what)))

    def summary(self) -> dict:
        points = [(self.start, None, "start")] + self.reports + [(self.end, None, "end")]
        gaps = [(b[0] - a[0], a[2]) for a, b in zip(points, points[1:])]
        gap, after = max(gaps)
        fracs = [f for _, f, _ in self.reports]
        back = [(a, b) for a, b in zip(fracs, fracs[1:]) if b < a - 1e-9]
        total = self.end - self.start
        return {"analysis": self.analysis, "seconds": total, "reports": len(self.reports), "gap": gap,
                "gap_frac": gap / total if total > 0 else 0.0, "after": after, "backwards": len(back),
                "first_back": back[0] if back else None}


def watched(trace: Trace, compute_run):
    """runner.compute_run that opens the trace while the traced analysis computes (its inputs' computes not)."""

    def wrapper(analysis, spec, *args, **kwargs):
        mine = analysis.name == trace.analysis
        if mine:
            trace.inside, trace.start = True, time.perf_counter() - trace.t0
        try:
            return compute_run(analysis, spec, *args, **kwargs)
        finally:
            if mine:
                trace.inside, trace.end = False, time.perf_counter() - trace.t0

    return wrapper


def page_spec(name: str, model: str, sae: str):
    """What the analysis's page runs by default (analyses without a page: their spec's defaults)."""
    a = get_analysis(name)
    fields = {"model": model, **(a.page.defaults if a.page is not None else {})}
    if name in SAE_BASED and sae == "small":
        fields.update(SMALL_SAE)
    return a.spec(**fields)


def measure(name: str, model: str, handle, store: Store, sae: str) -> dict:
    spec = page_spec(name, model, sae)
    a = get_analysis(name)
    t0 = time.perf_counter()
    resolve_inputs(a, resolve_tokens(spec, handle), store=store, handle=handle)  # inputs stored first
    inputs_s = time.perf_counter() - t0
    trace = Trace(name)
    original = runner.compute_run
    runner.compute_run = watched(trace, original)
    try:
        out = run(spec, store=store, progress=trace)
    finally:
        runner.compute_run = original
    assert not out.hit and trace.end is not None, f"{name}: the run came from the store"
    return {**trace.summary(), "inputs": inputs_s, "trace": trace}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--only", default="", help="comma-separated analyses (default: all in the registry)")
    ap.add_argument("--sae", default="small", choices=("small", "default"))
    ap.add_argument("--store", default="", help="a store to use (default: a fresh one)")
    ap.add_argument("--show", default="", help="comma-separated analyses whose every report is printed")
    ap.add_argument("--traces", default="", help="a JSON file to write every run's reports to")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    store = Store(Path(args.store) if args.store else Path(tempfile.mkdtemp()) / "progress.duckdb")
    handle = load_model(args.model)
    names = [n for n in args.only.split(",") if n] or [a.name for a in ANALYSES]
    show = {n for n in args.show.split(",") if n}
    traces = {}
    print("| analysis | inputs s | compute s | reports | longest gap s | gap / run | after | backwards | |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        try:
            r = measure(name, args.model, handle, store, args.sae)
        except Exception as e:  # noqa: BLE001 - one analysis failing is reported, the rest go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} ||||||||", flush=True)
            continue
        slow = "slow" if r["gap"] > SLOW_S and r["gap_frac"] > SLOW_FRAC else ""
        back = f"yes ({r['backwards']}: {r['first_back'][0]:.3f} -> {r['first_back'][1]:.3f})" if r["backwards"] \
            else "no"
        print(f"| {name} | {r['inputs']:.1f} | {r['seconds']:.2f} | {r['reports']} | {r['gap']:.2f} | "
              f"{r['gap_frac']:.0%} | {r['after'][:50]} | {back} | {slow} |", flush=True)
        t = r["trace"]
        traces[name] = {"seconds": r["seconds"], "reports": [(s - t.start, f, w) for s, f, w in t.reports]}
        if args.traces:
            Path(args.traces).write_text(json.dumps(traces, indent=1))
        if name in show:
            for t, f, what in r["trace"].reports:
                print(f"    {t - r['trace'].start:8.2f} s  {f:.3f}  {what}")
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
