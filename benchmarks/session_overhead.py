"""What the model session costs each run: opening and closing one (lock, snapshot and restore of every
parameter's requires_grad, every module's train/eval flag and hook registries) against one forward of the same
model on one 64-token prompt, in one process.

    python benchmarks/session_overhead.py [--repeats 50]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from timing import median_seconds  # noqa: E402

from analysis import load_model  # noqa: E402
from analysis.session import ModelSession  # noqa: E402


def gpt2_small_random(folder: Path) -> Path:
    """A GPT-2-small-shaped model (12 layers, d_model 768) with random weights and the default tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from analysis.models import DEFAULT_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, bos_token_id=0, eos_token_id=0)) \
        .save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("default", str(gpt2_small_random(Path(tmp) / "gpt2-small"))):
            h = load_model(name, device="cpu")
            tokens = torch.randint(0, h.summary.d_vocab, (1, 64))

            def session():
                with ModelSession(h):
                    pass

            def forward():
                with torch.no_grad():
                    h.bridge(tokens)

            s, _, _ = median_seconds(session, args.repeats)
            f, _, _ = median_seconds(forward, args.repeats)
            n_mod = sum(1 for _ in h.bridge.modules())
            label = "default" if name == "default" else "GPT-2-small-shaped"
            print(f"{label}: {n_mod} modules; session open+close {1000 * s:.2f} ms, one 64-token forward "
                  f"{1000 * f:.2f} ms, ratio {s / f:.3f}")


if __name__ == "__main__":
    main()
