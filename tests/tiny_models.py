"""Tiny random-weight models of three architectures, saved as Hugging Face folders.

Every analysis must pass on all three: GPT-2 (LayerNorm, GELU, learned positions), Llama-style (RMSNorm, gated
SiLU MLP, rotary positions, grouped-query attention) and GPT-NeoX/Pythia (parallel attention and MLP, rotary).
They share the default model's tokenizer so prompts mean the same thing.
"""
from __future__ import annotations

from pathlib import Path

import torch

from analysis.models import DEFAULT_MODEL_DIR

ARCHITECTURES = ("gpt2", "llama", "neox")


def _config(arch: str, vocab: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(bos_token_id=0, eos_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False, **common)
    if arch == "neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                             use_parallel_residual=True, **common)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Build a tiny random `arch` model and save it, with the default tokenizer, to `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tok)))
    # random init is small; scale it up a little so the models have non-trivial attention and predictions
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_foreign_tokenizer_model(folder: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 whose tokenizer has the default model's tokens under other ids (ids 1.. reversed; 0 stays the
    BOS/EOS token): the same text, other token ids, every id still in range. What a link's ids must not be
    replayed on without being made again from the text."""
    import json

    save_tiny_model("gpt2", folder, seed)
    spec = json.loads((Path(DEFAULT_MODEL_DIR) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    n = len(vocab)
    spec["model"]["vocab"] = {t: (0 if i == 0 else n - i) for t, i in vocab.items()}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def save_wide_vocab_model(folder: Path, width: int = 64, factor: int = 100, n_layers: int = 2, seed: int = 0) -> Path:
    """A random GPT-2 whose vocabulary is `factor` times its width (the default tokenizer's tokens, then tokens no
    text encodes to, `<extra_i>`, that the model can still predict): the shape of a small model with a huge
    vocabulary (Gemma 3 270M: width 640, 262,144 tokens), where work over the vocabulary is most of a run."""
    import json

    from transformers import AutoModelForCausalLM, GPT2Config

    vocab = width * factor
    spec = json.loads((Path(DEFAULT_MODEL_DIR) / "tokenizer.json").read_text())
    words = spec["model"]["vocab"]
    if vocab < len(words):
        raise ValueError(f"a vocabulary of {vocab} is smaller than the default tokenizer's {len(words)} tokens")
    words.update({f"<extra_{i}>": i for i in range(len(words), vocab)})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=width,
                                                        n_layer=n_layers, n_head=max(1, width // 32),
                                                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in Path(DEFAULT_MODEL_DIR).iterdir():  # the tokenizer's other files, then its widened vocabulary
        if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and name.is_file():
            (folder / name.name).write_bytes(name.read_bytes())
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    for stale in ("vocab.json", "merges.txt"):  # a slow tokenizer's files would disagree with tokenizer.json
        (folder / stale).unlink(missing_ok=True)
    return folder
