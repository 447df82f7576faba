"""A 1 B model on one CPU machine: load time and peak memory in bfloat16, and each page's default on it.

    python benchmarks/large_model.py [--folder /tmp/llama-1b] [--analyses model,lens,...] [--skip-analyses]

Builds (once, no download) a random-weights model of Llama-3.2-1B's shape — width 2048, 16 layers, 32 query and
8 key/value heads, MLP 8192, vocabulary 128,256, tied embeddings: 1.24 B parameters — saved in bfloat16 with the
shipped model's tokenizer (its ids are a subset of the vocabulary). Then, each in a fresh process so that peaks
do not mix:

- plain transformers: `AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)`;
- ours: `analysis.load_model(folder, dtype="bfloat16")` (config, memory check, tokenizer, weights, the bridge);

time and peak resident memory above the process's memory after its imports, against the bfloat16 weights and
one layer (the target: peak <= 1.2 x weights + one layer). With analyses, each page's default analysis with the
smaller settings the page picks for this model (analysis.estimate.smaller_defaults), estimate and measured time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True,
             rope_theta=500000.0, rms_norm_eps=1e-5, head_dim=64)


def build(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from analysis.models import DEFAULT_MODEL_DIR

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, torch_dtype="bfloat16")
    t = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)
    print(f"built {folder} in {time.perf_counter() - t:.0f} s")


CHILD = r"""
import json, os, sys, threading, time, psutil, torch
sys.path.insert(0, {root!r})
proc = psutil.Process()
import transformers, transformer_lens  # noqa: F401 - imports are not the load's memory
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
from analysis import load_model
from analysis.models import estimate_parameters  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
if {which!r} == "plain":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.bfloat16)
else:
    m = load_model({folder!r}, dtype="bfloat16")
took = time.perf_counter() - t
stop.set()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps(dict(seconds=took, peak=peak[0] - base, after=proc.memory_info().rss - base)))
"""


def measure(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), which=which, folder=str(folder))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def analyses(folder: Path, names: list[str]) -> None:
    import tempfile

    from analysis import load_model
    from analysis.estimate import smaller_defaults
    from analysis.registry import ANALYSES, get_analysis
    from analysis.runner import estimate_unstored, resolve_inputs, resolve_tokens, run
    from analysis.specs import PromptSpec
    from analysis.store import Store

    handle = load_model(str(folder), dtype="bfloat16")
    store = Store(Path(tempfile.mkdtemp()) / "s.duckdb")
    print("| analysis | settings chosen | estimate | measured |")
    print("|---|---|---|---|")
    for a in ANALYSES:
        if names and a.name not in names:
            continue
        base = {"model": str(folder), "dtype": "bfloat16"}
        if issubclass(a.spec, PromptSpec):
            base["prompt"] = "The capital of France is"
        chosen, _, _ = smaller_defaults(get_analysis(a.name), handle.summary, base)
        spec = a.spec.from_dict({**base, **chosen})
        t = time.perf_counter()
        try:  # one page failing is a finding to print, not the end of the table
            resolve_inputs(a, spec, store=store, handle=handle)
            # what the page shows: its own work and any input run the store does not hold yet
            est = f"{estimate_unstored(a, resolve_tokens(spec, handle), handle, store).total_seconds:.0f} s"
            t = time.perf_counter()
            run(spec, store=store)
            took = f"{time.perf_counter() - t:.0f} s"
        except Exception as e:  # noqa: BLE001
            est, took = locals().get("est", "-"), f"failed after {time.perf_counter() - t:.0f} s: {e}"[:300]
        print(f"| {a.name} | {chosen or 'defaults'} | {est} | {took} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/llama-1b-shape")
    ap.add_argument("--analyses", default="")
    ap.add_argument("--skip-analyses", action="store_true")
    args = ap.parse_args()
    folder = Path(args.folder)
    build(folder)
    params = (SHAPE["vocab_size"] * SHAPE["hidden_size"] + SHAPE["num_hidden_layers"] * (
        2 * SHAPE["hidden_size"] ** 2 + 2 * SHAPE["hidden_size"] * SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
        + 3 * SHAPE["hidden_size"] * SHAPE["intermediate_size"] + 2 * SHAPE["hidden_size"]) + SHAPE["hidden_size"])
    layer = (params - SHAPE["vocab_size"] * SHAPE["hidden_size"]) // SHAPE["num_hidden_layers"]
    weights = 2 * params
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {params / 1e9:.2f} B parameters, bfloat16 "
          f"weights {weights / 2**30:.2f} GiB, one layer {2 * layer / 2**20:.0f} MiB; target peak <= "
          f"{(1.2 * weights + 2 * layer) / 2**30:.2f} GiB")
    print("| load | seconds | peak above imports | x weights | held after |")
    print("|---|---|---|---|---|")
    for which in ("plain", "ours"):
        m = measure(which, folder)
        print(f"| {which} | {m['seconds']:.1f} s | {m['peak'] / 2**30:.2f} GiB | {m['peak'] / weights:.2f} | "
              f"{m['after'] / 2**30:.2f} GiB |", flush=True)
    if not args.skip_analyses:
        analyses(folder, [a for a in args.analyses.split(",") if a])


if __name__ == "__main__":
    main()
