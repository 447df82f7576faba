"""Reopening a stored result (store read -> figures) versus recomputing it, for the Model page.

    python benchmarks/store_read.py [--prompt-tokens 60] [--repeats 30]

The target (issue 3): reopening a stored Model-page result takes under 200 ms. "Reopen" is what a shared link
does in review mode: look the model up in the store, compute the run key, read the result's tables, build the
plotly figures and serialise them to JSON as Streamlit does. "Recompute" is the no-cache path (what tools without
a store do): the forward passes and the tidy tables, with the model already loaded.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import median_seconds  # noqa: E402

from analysis.analyses.model_view.figures import figures as model_view_figures  # noqa: E402
from analysis.analyses.model_view.spec import ModelViewSpec  # noqa: E402
from analysis.registry import REGISTRY  # noqa: E402
from analysis.runner import run  # noqa: E402
from analysis.session import ModelSession  # noqa: E402
from analysis.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    words = ("Then, John and Mary went to the store. John gave a ring to Mary. " * 20).split()
    prompt = " ".join(words[: args.prompt_tokens - 1])
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb")
        spec = ModelViewSpec(prompt=prompt, top_k=10)
        first = run(spec, store=store)  # loads the model, computes, stores
        link = ModelViewSpec.from_dict(first.spec.to_dict())  # what a shared link carries (with token ids)

        def reopen():
            out = run(link, store=store, allow_compute=False)
            for fig in model_view_figures(out.result, layer=3, head=1).values():
                fig.to_json()

        def recompute():
            from analysis.models import load_model

            handle = load_model(spec.model)
            with ModelSession(handle) as session:
                result = REGISTRY["model"].compute(session, first.spec, {}, lambda f, w: None)
            for fig in model_view_figures(result, layer=3, head=1).values():
                fig.to_json()

        timings = {name: median_seconds(fn, args.repeats)[1]
                   for name, fn in [("reopen from store", reopen), ("recompute (no store)", recompute)]}
        n_att = len(first.result.extra["attention"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print(f"Model page result: {len(first.spec.token_ids)} tokens, {n_att:,} attention rows, top-10 predictions")
    for name, ts in timings.items():
        print(f"{name:22s} median {1000 * statistics.median(ts):7.1f} ms   p90 "
              f"{1000 * sorted(ts)[int(0.9 * len(ts))]:7.1f} ms")
    ratio = statistics.median(timings["recompute (no store)"]) / statistics.median(timings["reopen from store"])
    print(f"reopen is {ratio:.1f}x faster than recomputing; target < 200 ms: "
          f"{'met' if statistics.median(timings['reopen from store']) < 0.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
