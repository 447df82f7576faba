"""The activation atlas of 5,000 points: time to build it, ours against plain umap-learn, in fresh processes.

    python benchmarks/atlas.py [--points 5000]

Target (issue 6): the atlas of 5,000 points builds in under 30 s on 2 CPU cores. "Build" is everything after the
model is loaded: the activations of the shipped sentences at the last layer (every token), the sampling, UMAP and
the tidy table (run(AtlasSpec) into an empty store). Most of UMAP's cost on a small machine is numba compiling,
so each figure is taken in a new process:

- cold: a numba cache folder that has never been used (the first atlas on a new machine);
- second process: the same cache folder again (every later process on that machine; the app also warms umap up
  in a background thread when the Concepts page opens);
- warm: a second build in the same process (what the app does after its warm-up).

The peer is plain umap-learn as a notebook would call it (`umap.UMAP(random_state=seed).fit_transform(X)`, its
own approximate neighbours through pynndescent) on the same activations, under the same three conditions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(which: str, points: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from analysis.analyses.atlas.compute import AtlasSpec, token_activations
    from analysis.concept_data import shipped
    from analysis.models import load_model
    from analysis.runner import run
    from analysis.session import ModelSession
    from analysis.store import Store
    from analysis.tokens import encode_texts

    handle = load_model("default")
    out = {}
    if which == "ours":
        with tempfile.TemporaryDirectory() as tmp:
            for name, seed in (("first", 0), ("warm", 1)):
                t0 = time.perf_counter()
                res = run(AtlasSpec(max_points=points, seed=seed), store=Store(Path(tmp) / "s.duckdb"))
                out[name] = time.perf_counter() - t0
                out[f"{name}_umap"] = res.result.meta["embed_seconds"]
            out["n_points"] = res.result.meta["n_points"]
    else:
        t0 = time.perf_counter()
        seqs = encode_texts(handle, shipped()["text"])
        with ModelSession(handle) as session:
            X, _, _ = token_activations(session, seqs, handle.summary.n_layers - 1)
        X = X[np.sort(np.random.default_rng(0).choice(len(X), points, replace=False))]
        t_acts = time.perf_counter() - t0
        import umap  # imported here, as the first use in a notebook would

        for name, seed in (("first", 0), ("warm", 1)):
            t1 = time.perf_counter()
            umap.UMAP(random_state=seed).fit_transform(X)
            out[name] = t_acts + time.perf_counter() - t1 if name == "first" else time.perf_counter() - t1
        out["n_points"] = len(X)
    print("RESULT " + json.dumps(out))


def measure(which: str, points: int, cache: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--points", str(points)], env=env,
                          capture_output=True, text=True, check=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=5000)
    ap.add_argument("--child", choices=("ours", "peer"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.points)
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as ours_cache, tempfile.TemporaryDirectory() as peer_cache:
        rows = {}
        for which, cache in (("ours", ours_cache), ("peer", peer_cache)):
            cold = measure(which, args.points, cache)
            second = measure(which, args.points, cache)
            rows[which] = {"cold": cold["first"], "second process": second["first"], "warm": second["warm"]}
            print(f"{which}: {cold['n_points']} points; " +
                  ", ".join(f"{k} {v:.1f} s" for k, v in rows[which].items()) +
                  (f" (UMAP itself: cold {cold['first_umap']:.1f} s, second process {second['first_umap']:.1f} s, "
                   f"warm {second['warm_umap']:.1f} s)" if which == "ours" else ""))
        for k in rows["ours"]:
            print(f"{k}: ours {rows['ours'][k]:.1f} s, umap-learn as usually called {rows['peer'][k]:.1f} s, "
                  f"ratio {rows['peer'][k] / rows['ours'][k]:.2f}x; target < 30 s: "
                  f"{'met' if rows['ours'][k] < 30 else 'NOT met'}")


if __name__ == "__main__":
    main()
