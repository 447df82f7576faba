"""Activation patching sweeps and RelP on a GPU: ours (kernels/) and TransformerLens 4.3's `patching` side by side.

    python benchmarks/patching_gpu.py [--device cuda] [--repeats 5] [--small]

Issue 4's GPU targets: a GPT-2-small-shaped model with random weights (12 layers, 12 heads, d_model 768,
vocab 50257), 20-token prompts, 8 prompt pairs: resid_pre and head-by-position (z) sweeps at least 50x faster
than TransformerLens, identical results; RelP for all component types in at most 4x one forward + backward.
Also: the same in bfloat16 and float16, and a check of the CUDA path of every method on the default model
(cuda results against cpu results). `--small` runs a 2-layer model on any device, to try the script out.

Prompt pairs: random tokens; the corrupted prompt differs from the clean one at two positions (4 and 12, as the
names differ in IOI pairs). A second resid_pre run corrupts every position, so that nothing can be skipped.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's sweeps draw progress bars
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from timing import forward_backward  # noqa: E402
from transformer_lens import patching as tl  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.models import DEFAULT_MODEL_DIR  # noqa: E402
from analysis.tasks import ioi_pairs  # noqa: E402
from kernels.attribution import LRPRules, attribution_scores, integrated_gradients  # noqa: E402
from kernels.patching import ACTIVATIONS, BlockRunner, activation_patch_sweep, source_activations  # noqa: E402

TL_SWEEPS = {"resid_pre": tl.get_act_patch_resid_pre, "z_by_pos": tl.get_act_patch_attn_head_out_by_pos}
RELP_TYPES = ["resid_pre", "resid_post", "attn_out", "mlp_out", "z_by_pos", "q_by_pos", "k_by_pos", "v_by_pos",
              "pattern_by_pos"]


def timed(fn, repeats: int, device: str):
    """Warm-up run (its result is returned), then `repeats` timed runs, synchronising the device: (median, result)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    result = fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def save_gpt2_small(folder: Path, small: bool) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    # initializer_range 0.08 instead of GPT-2's 0.02: final logits spread (std ~2.2 instead of 0.55), so the
    # patched logit differences are of order 1 and the equality checks mean something
    shape = dict(n_layer=2, n_head=4, n_embd=64) if small else {}
    cfg = GPT2Config(initializer_range=0.08, **shape)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)  # not used: prompts are token ids
    return folder


def make_pairs(vocab: int, n_pairs: int, n_tokens: int, device: str, corrupt_all: bool = False):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (n_pairs, n_tokens), generator=g)
    corr = clean.clone()
    cols = list(range(n_tokens)) if corrupt_all else [4, 12]
    corr[:, cols] = torch.randint(0, vocab, (n_pairs, len(cols)), generator=g)
    ans, wrong = torch.randint(0, vocab, (2, n_pairs), generator=g)
    return [t.to(device) for t in (clean, corr, ans, wrong)]


def logit_diff_fns(ans, wrong):
    B = ans.shape[0]

    def batch(logits):  # TransformerLens: [B, P, V] -> scalar
        last = logits[:, -1].float()
        return (last.gather(1, ans[:, None]) - last.gather(1, wrong[:, None])).mean()

    def rows(logits):  # ours: final-position logits [rows, V] -> [rows]
        n = logits.shape[0] // B
        logits = logits.float()
        return (logits.gather(1, ans.repeat(n)[:, None]) - logits.gather(1, wrong.repeat(n)[:, None]))[:, 0]

    return batch, rows


def sweep_vs_tl(bridge, clean, corr, ans, wrong, name, repeats, device, tl_repeats):
    batch, rows = logit_diff_fns(ans, wrong)
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
    source = source_activations(bridge, clean, name)

    def ours():
        with torch.no_grad():
            runner = BlockRunner(bridge, corr)  # the corrupted run's forward, then the sweep
            return activation_patch_sweep(runner, source, name, rows, source_tokens=clean).values.mean(-1)

    def theirs():
        with torch.no_grad():
            return TL_SWEEPS[name](bridge, corr, clean_cache, batch)

    t_ours, r_ours = timed(ours, repeats, device)
    if tl_repeats:
        t_tl, r_tl = timed(theirs, tl_repeats, device)
    else:  # one cold-ish run (the model is warm from the other sweeps): TransformerLens's z sweep is minutes long
        t0 = time.perf_counter()
        r_tl = theirs()
        if device == "cuda":
            torch.cuda.synchronize()
        t_tl = time.perf_counter() - t0
    diff = (r_ours.float() - r_tl.float()).abs().max().item()
    scale = r_tl.float().abs().max().item()
    return t_ours, t_tl, diff, scale, r_ours


def relp_vs_fwd_bwd(bridge, clean, corr, ans, wrong, repeats, device):
    _, rows = logit_diff_fns(ans, wrong)
    src = {}
    for a in RELP_TYPES:
        src.update(source_activations(bridge, clean, a))

    def relp():
        with torch.enable_grad():
            return attribution_scores(bridge, corr, src, RELP_TYPES, lambda lg: rows(lg).mean(), LRPRules())

    def fwd_bwd():
        forward_backward(bridge, corr, rows)

    t_relp, _ = timed(relp, repeats, device)
    t_fb, _ = timed(fwd_bwd, repeats, device)
    return t_relp, t_fb


def default_model_cuda_check(device: str) -> None:
    """Every method on the default model on `device` against the same on cpu (float32)."""
    import json

    from analysis.analyses.patching.compute import compute
    from analysis.analyses.patching.spec import PatchingSpec
    from analysis.session import ModelSession

    rows = ioi_pairs(load_model("default", device=device)).rows
    n = len(rows[0]["clean_ids"])
    pairs = [{k: r[k] for k in ("clean_ids", "corrupted_ids")} | {"answer_id": r["io_id"], "wrong_id": r["s_id"]}
             for r in rows if len(r["clean_ids"]) == n][:8]
    comps = tuple(a for a in ACTIVATIONS)
    spec = PatchingSpec(pairs=json.dumps(pairs), components=comps, methods=("activation", "atp", "relp", "ig"),
                        ig_steps=16)
    tables = {}
    for dev in ("cpu", device):
        handle = load_model("default", device=dev)
        t0 = time.perf_counter()
        with ModelSession(handle) as session:
            tables[dev] = compute(session, spec.resolve(handle), {}, lambda *a: None).table
        print(f"  default model, {dev}: all {len(comps)} component types x 4 methods in "
              f"{time.perf_counter() - t0:.1f} s")
    a, b = tables["cpu"], tables[device]
    for method in spec.methods:
        m = a["method"] == method
        d = (a.loc[m, "value"].to_numpy() - b.loc[m, "value"].to_numpy())
        d = abs(d[~(d != d)]).max()  # NaN-free (AH rule leaves q/k/pattern unavailable: none here)
        print(f"  {method:10s} {device} vs cpu: max abs diff {d:.1e} over {int(m.sum())} values")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a 2-layer model, to try the script out")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = ap.parse_args()
    device = args.device
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    from importlib.metadata import version
    print(f"transformer-lens {version('transformer-lens')}, transformers {version('transformers')}, "
          f"{os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_gpt2_small(Path(tmp) / "gpt2-small-random", args.small)
        for dtype in args.dtypes.split(","):
            handle = load_model(str(folder), device=device, dtype=dtype)
            bridge = handle.bridge
            cfg = bridge.cfg
            if dtype == args.dtypes.split(",")[0]:
                print(f"model: GPT-2 shape, random weights, {cfg.n_layers} layers, {cfg.n_heads} heads, "
                      f"d_model {cfg.d_model}, vocab {cfg.d_vocab}; 8 pairs x 20 tokens, logit difference")
            clean, corr, ans, wrong = make_pairs(cfg.d_vocab, 8, 20, device)
            full = dtype == "float32"
            for name in ("resid_pre", "z_by_pos"):
                if name == "z_by_pos" and not full:
                    continue
                t_o, t_t, diff, scale, _ = sweep_vs_tl(bridge, clean, corr, ans, wrong, name, args.repeats, device,
                                                       tl_repeats=3 if name == "resid_pre" else 0)
                n = cfg.n_layers * 20 * (cfg.n_heads if name == "z_by_pos" else 1)
                print(f"{dtype:9s} {name:9s} {n:5d} patches: ours {t_o * 1e3:8.1f} ms, TransformerLens "
                      f"{t_t * 1e3:9.1f} ms -> {t_t / t_o:6.1f}x faster; max abs diff {diff:.1e} "
                      f"(values up to {scale:.2f})")
            if full:
                c2, k2, a2, w2 = make_pairs(cfg.d_vocab, 8, 20, device, corrupt_all=True)
                t_o, t_t, diff, scale, _ = sweep_vs_tl(bridge, c2, k2, a2, w2, "resid_pre", args.repeats, device, 3)
                print(f"{dtype:9s} resid_pre, every position corrupted: ours {t_o * 1e3:8.1f} ms, TransformerLens "
                      f"{t_t * 1e3:9.1f} ms -> {t_t / t_o:6.1f}x faster; max abs diff {diff:.1e}")
            t_relp, t_fb = relp_vs_fwd_bwd(bridge, clean, corr, ans, wrong, args.repeats, device)
            print(f"{dtype:9s} RelP, all {len(RELP_TYPES)} component types: {t_relp * 1e3:.1f} ms = "
                  f"{t_relp / t_fb:.2f}x one forward + backward ({t_fb * 1e3:.1f} ms)")
            del handle, bridge
            from analysis.models import MODEL_CACHE
            MODEL_CACHE.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
    print("CUDA path check (default model, 8 IOI pairs, every component type and method):")
    default_model_cuda_check(device)
    # integrated gradients on the GPU too (Captum), timing only
    h = load_model("default", device=device)
    clean, corr, ans, wrong = make_pairs(h.bridge.cfg.d_vocab, 8, 16, device)
    _, rows = logit_diff_fns(ans, wrong)
    t_ig, _ = timed(lambda: integrated_gradients(h.bridge, corr, clean, ["attn_out"], lambda lg: rows(lg) / 8,
                                                 n_steps=32), 2, device)
    print(f"  integrated gradients (32 steps, attn_out) on {device}: {t_ig * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
