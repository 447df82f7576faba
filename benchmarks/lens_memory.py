"""Lens statistics over the vocabulary: the blocked kernel (kernels/lens.py) against the naive full tensor.

    python benchmarks/lens_memory.py [--tokens 1024] [--device cpu|cuda]

Issue 5's target: on a GPT-2-small-shaped model (vocab 50257) with 1024 tokens, peak extra memory at most a
quarter of the naive full tensor (layers x positions x vocab float32 logits), at a speed no worse than the naive
computation. Both compute, for the residual entering every block and the final residual (13 x 1024 rows):
log-sum-exp, entropy, KL to the model's final distribution, top-5 and the log-probability and rank of one target
token per position.

Each variant runs in its own process (so freed memory cannot flatter the second); peak extra memory is the
process's resident set sampled every millisecond above its level just before the computation (CPU), or
torch.cuda.max_memory_allocated above the allocation before it (GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def residuals(n_tokens: int, device: str):
    """Random GPT-2 small (12 layers, d_model 768, vocab 50257): normalised residuals [13 * n_tokens, 768]."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from analysis import load_model
    from analysis.models import DEFAULT_MODEL_DIR

    folder = Path(tempfile.mkdtemp()) / "gpt2-small-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(initializer_range=0.08)).save_pretrained(folder)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)
    bridge = load_model(str(folder), device=device).bridge
    L = bridge.cfg.n_layers
    tokens = torch.randint(0, bridge.cfg.d_vocab, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens.to(device), names_filter=lambda n: n in names)
        h = torch.stack([cache[n][0] for n in names])  # [L + 1, P, d]
        x = bridge.ln_final(h).reshape(-1, h.shape[-1])  # the final norm recomputed on every layer's residual
        final = x[-n_tokens:]
    W_U, b_U = bridge.W_U.detach(), bridge.b_U.detach()
    targets = torch.randint(0, W_U.shape[1], (n_tokens, 1), generator=torch.Generator().manual_seed(2)).to(device)
    ref_index = torch.arange(n_tokens, device=device).repeat(L + 1)
    return x.contiguous(), W_U, b_U, final.contiguous(), ref_index, targets.repeat(L + 1, 1)


def child(variant: str, n_tokens: int, device: str) -> None:
    import psutil
    import torch

    from kernels.lens import lens_stats, naive_lens_stats

    x, W_U, b_U, final, ref_index, targets = residuals(n_tokens, device)
    fn = lens_stats if variant == "blocked" else naive_lens_stats
    proc = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    with torch.no_grad():
        fn(x[:64], W_U, b_U, ref=final, ref_index=ref_index[:64], targets=targets[:64], k=5)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        base = proc.memory_info().rss
        peak[0] = base
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        out = fn(x, W_U, b_U, ref=final, ref_index=ref_index, targets=targets, k=5)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
    extra = (torch.cuda.max_memory_allocated() - before) if device == "cuda" else peak[0] - base
    summary = {"kl_last": out.kl[-n_tokens:].abs().max().item(), "entropy_mean": out.entropy.mean().item(),
               "rank0": out.target_rank[:5, 0].tolist(), "top0": out.top_ids[0].tolist()}
    print(json.dumps({"variant": variant, "seconds": seconds, "extra_bytes": extra, "rows": x.shape[0],
                      "vocab": W_U.shape[1], **summary}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tokens, args.device)
        return
    import platform

    res = {}
    for variant in ("blocked", "naive"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                              "--device", args.device], capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    b, n = res["blocked"], res["naive"]
    full = b["rows"] * b["vocab"] * 4
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, device {args.device}")
    print(f"GPT-2-small shape, random weights, {args.tokens} tokens, {b['rows']} lens rows (13 layers x positions), "
          f"vocab {b['vocab']}: the full float32 logits tensor is {full / 2**30:.2f} GiB")
    for v in (b, n):
        print(f"{v['variant']:8s} {v['seconds']:7.2f} s, peak extra memory {v['extra_bytes'] / 2**20:8.0f} MiB "
              f"({v['extra_bytes'] / full:.3f} of the full tensor)")
    same = b["rank0"] == n["rank0"] and b["top0"] == n["top0"] and abs(b["entropy_mean"] - n["entropy_mean"]) < 1e-3
    print(f"blocked / naive: memory {b['extra_bytes'] / max(n['extra_bytes'], 1):.3f}, time "
          f"{b['seconds'] / n['seconds']:.2f}; results agree: {same}; KL at the last layer "
          f"{b['kl_last']:.1e} (blocked), {n['kl_last']:.1e} (naive)")


if __name__ == "__main__":
    main()
