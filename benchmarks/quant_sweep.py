"""A full quantization-sensitivity sweep: every weight matrix alone x every format, ours against the naive loop.

    python benchmarks/quant_sweep.py                          # the default model, CPU
    python benchmarks/quant_sweep.py --model gpt2-small-random --device cuda

Target (issue 7): every matrix x the integer and FP formats (27 formats) on the default model in under 60 s on
2 CPU cores; the GPU path measured on a GPT-2-small-shaped model. Evaluation set: 16 x 64 tokens of the model's
own text. Ours: `analysis.quant.measure_sweep` (each matrix quantized in place, the forward restarted at the
block it sits in from the recorded full-precision residual; the unembedding alone needs only the final
projection). Peer, as a notebook would write it: a plain transformers model, each matrix quantized in place with
the same fake-quant kernel and a full forward from the embeddings, the same KL / loss / top-1 metrics. Both in this
process, on a subset of the sweep for the peer when it is long (its time per evaluation is what is compared).
Also timed: Hutchinson traces of every matrix (double backprop per sample).
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
import torch  # noqa: E402

from analysis.analyses.quant.compute import Damage, hutchinson, measure_sweep, model_text, unit_groups, weight_units  # noqa: E402
from analysis.models import load_model  # noqa: E402
from analysis.session import ModelSession  # noqa: E402
from kernels.quant import WEIGHT_FORMATS, fake_quant_weight  # noqa: E402


def gpt2_small_random(folder: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from analysis.models import DEFAULT_MODEL_DIR

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)  # ids < 1245 are all the text uses
    return folder


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--peer-evals", type=int, default=120, help="evaluations of the naive loop timed")
    ap.add_argument("--hutchinson-samples", type=int, default=20)
    ap.add_argument("--formats", default=",".join(WEIGHT_FORMATS), help="comma-separated (default: all 27)")
    args = ap.parse_args()
    dev = args.device
    formats = tuple(f for f in args.formats.split(",") if f)
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f"{', ' + gpu if gpu else ''}; threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        name = str(gpt2_small_random(Path(tmp) / "g")) if args.model == "gpt2-small-random" else args.model
        handle = load_model(name, device=dev, dtype=args.dtype)
        with ModelSession(handle) as session:  # held for the whole benchmark (one process, one user)
            tokens = model_text(session, 16, 64, seed=0)
            if args.model == "gpt2-small-random":  # a random model's own text is noise; keep the vocabulary small
                tokens = torch.randint(0, 1245, tokens.shape, generator=torch.Generator().manual_seed(0)).to(dev)
            units = weight_units(session)
            groups = unit_groups(session, units, ("matrix",))
            print(f"{name}: {len(units)} matrices, {sum(u.n for u in units):,} parameters, {len(formats)} formats, "
                  f"{tokens.numel()} tokens -> {len(groups) * len(formats)} evaluations")

            sync(dev)
            t0 = time.perf_counter()
            sweep, _ = measure_sweep(session, tokens, groups, formats)
            sync(dev)
            ours = time.perf_counter() - t0
            n_evals = len(sweep)
            print(f"ours: full sweep {ours:.1f} s ({1000 * ours / n_evals:.1f} ms per evaluation)")

            # the naive loop on a plain transformers model
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(handle.path, dtype=getattr(torch, args.dtype)).to(dev).eval()
            mats = [(n, p, 1 if type(dict(hf.named_modules())[n.rsplit(".", 1)[0]]).__name__ == "Conv1D" else 0)
                    for n, p in hf.named_parameters() if p.dim() == 2]
            with torch.no_grad():
                damage = Damage(tokens, hf(tokens).logits)
                pairs = [(m, f) for m in mats for f in formats][::max(1, (len(mats) * len(formats))
                                                                              // args.peer_evals)][:args.peer_evals]
                sync(dev)
                t0 = time.perf_counter()
                kls = []
                for (n, p, out_dim), f in pairs:
                    old = p.detach().clone()
                    p.copy_(fake_quant_weight(old, f, out_dim))
                    kls.append(damage(hf(tokens).logits)["kl"])
                    p.copy_(old)
                sync(dev)
                peer = (time.perf_counter() - t0) / len(pairs)
            print(f"naive loop: {1000 * peer:.1f} ms per evaluation over {len(pairs)} evaluations -> "
                  f"{peer * n_evals:.1f} s for the sweep")
            target = (f"; target < 60 s on 2 CPU cores: {'met' if ours < 60 else 'NOT met'}"
                      if args.model == "default" and dev == "cpu" and len(formats) == len(WEIGHT_FORMATS) else "")
            print(f"full sweep: ours {ours:.1f} s, naive {peer * n_evals:.1f} s (estimated), ratio "
                  f"{peer * n_evals / ours:.2f}x{target}")
            # the same KL where both measured the same matrix and format
            ours_kl = {(u, f): k for u, f, k in zip(sweep["unit"], sweep["format"], sweep["kl"])}
            diffs = [abs(ours_kl[(u, f)] - k) for ((n, _, _), f), k in zip(pairs, kls)
                     for u in [n] if (u, f) in ours_kl]
            if diffs:
                print(f"max |KL ours - KL naive| over {len(diffs)} shared evaluations: {max(diffs):.2e}")

            sync(dev)
            t0 = time.perf_counter()
            tr = hutchinson(session, tokens, units, tol=1e-9, min_samples=args.hutchinson_samples,
                            max_samples=args.hutchinson_samples, seed=0)
            sync(dev)
            ht = time.perf_counter() - t0
            print(f"Hutchinson: {args.hutchinson_samples} samples of all {len(units)} matrices in {ht:.1f} s "
                  f"({ht / args.hutchinson_samples:.2f} s per sample); median relative standard error "
                  f"{(tr['trace_se'] / tr['trace'].abs()).median():.3f}")


if __name__ == "__main__":
    main()
