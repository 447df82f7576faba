"""What the Model page shows: tokenization, top next-token predictions, attention patterns.

Each function takes a `ModelHandle` and returns a tidy pandas DataFrame (long format, named columns).
"""
from __future__ import annotations

import pandas as pd
import torch

from .errors import WorkbenchError
from .models import ModelHandle

MAX_PROMPT_CHARS = 20_000


def same_length_batches(seqs: list[list[int]], indices=None, batch: int = 64):
    """Yield (indices, token tensor) batches of sequences of one length each (those at `indices`, default all)."""
    by_len: dict[int, list[int]] = {}
    for i in (range(len(seqs)) if indices is None else indices):
        by_len.setdefault(len(seqs[i]), []).append(int(i))
    for group in by_len.values():
        for c in range(0, len(group), batch):
            idx = group[c:c + batch]
            yield idx, torch.tensor([seqs[i] for i in idx])


def cache_in_batches(handle: ModelHandle, seqs: list[list[int]], names, visit, indices=None,
                     batch: int = 64) -> None:
    """Run the sequences (those at `indices`, default all) in batches of one length each, caching the hooks in
    `names`, and call visit(batch indices, cache) for each batch, with the model's lock held."""
    names = set(names)
    with handle.lock, torch.no_grad():
        for idx, toks in same_length_batches(seqs, indices, batch):
            _, cache = handle.bridge.run_with_cache(toks.to(handle.device), names_filter=lambda n: n in names)
            visit(idx, cache)


def last_logits(handle: ModelHandle, seqs: list[list[int]], batch: int = 64) -> torch.Tensor:
    """[N, vocab] float32 logits at the last position of each sequence (run in batches of one length)."""
    out = torch.zeros(len(seqs), handle.summary.d_vocab)
    with handle.lock, torch.no_grad():
        for idx, toks in same_length_batches(seqs, batch=batch):
            out[idx] = handle.bridge(toks.to(handle.device))[:, -1].float().cpu()
    return out


def single_token_ids(handle: ModelHandle, tokens, what: str = "token") -> list[int]:
    """One id per token string (leading spaces count); a string that is not one token is refused."""
    ids = []
    for t in tokens:
        enc = handle.tokenizer.encode(t, add_special_tokens=False)
        if len(enc) != 1:
            raise WorkbenchError(f"The {what} {t!r} is {len(enc)} tokens for this model; each must be one token.",
                                 hint="Leading spaces matter: ' Paris' and 'Paris' are different tokens.")
        ids.append(enc[0])
    return ids


def encode(handle: ModelHandle, prompt: str) -> list[int]:
    """Token ids of a prompt, with the model's BOS token in front as TransformerLens adds it."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise WorkbenchError("The prompt is empty.", hint="Type some text to run the model on.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise WorkbenchError(f"The prompt has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}.")
    ids = handle.bridge.to_tokens(prompt, prepend_bos=True, truncate=False)[0].tolist()
    check_token_ids(handle, ids)
    return ids


def check_token_ids(handle: ModelHandle, ids: list[int]) -> None:
    """Token ids a link or a file supplied must fit the model: in vocabulary range and context length."""
    n_ctx, d_vocab = handle.summary.n_ctx, handle.summary.d_vocab
    if not ids:
        raise WorkbenchError("There are no tokens to run.")
    if len(ids) > n_ctx:
        raise WorkbenchError(f"The prompt is {len(ids)} tokens long; this model's context is {n_ctx} tokens.",
                             hint="Shorten the prompt.")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < d_vocab]
    if bad:
        raise WorkbenchError(f"Token ids {bad[:5]} are outside this model's vocabulary (0..{d_vocab - 1}).",
                             hint="Was the link made with another model?")


def token_strings(handle: ModelHandle, ids: list[int]) -> list[str]:
    return [handle.tokenizer.decode([i]) for i in ids]


def tokenize(handle: ModelHandle, ids: list[int]) -> pd.DataFrame:
    """One row per position: pos, token_id, token (its text)."""
    return pd.DataFrame({"pos": range(len(ids)), "token_id": ids, "token": token_strings(handle, ids)})


@torch.no_grad()
def next_token_predictions(handle: ModelHandle, ids: list[int], k: int = 10) -> pd.DataFrame:
    """The k most likely next tokens after the last position: rank, token_id, token, logit, prob, logprob."""
    check_token_ids(handle, ids)
    k = max(1, min(int(k), handle.summary.d_vocab))
    tokens = torch.tensor([ids], device=handle.device)  # [1, pos]
    with handle.lock:
        logits = handle.bridge(tokens, return_type="logits")[0, -1].float()  # [d_vocab]
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(k)
    top_ids = top.indices.tolist()
    return pd.DataFrame({
        "rank": range(1, k + 1),
        "token_id": top_ids,
        "token": token_strings(handle, top_ids),
        "logit": logits[top.indices].tolist(),
        "prob": top.values.exp().tolist(),
        "logprob": top.values.tolist(),
    })


@torch.no_grad()
def attention_patterns(handle: ModelHandle, ids: list[int], layers: list[int] | None = None) -> pd.DataFrame:
    """Attention weights in long format: layer, head, query_pos, key_pos, weight (causal: key_pos <= query_pos)."""
    check_token_ids(handle, ids)
    n_layers = handle.summary.n_layers
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if any(not 0 <= layer < n_layers for layer in layers):
        raise WorkbenchError(f"Layers must be between 0 and {n_layers - 1}.")
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    tokens = torch.tensor([ids], device=handle.device)
    with handle.lock:
        _, cache = handle.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    frames = []
    n = len(ids)
    q, kpos = torch.tril_indices(n, n)
    for layer in layers:
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].float().cpu()  # [head, query_pos, key_pos]
        for head in range(pattern.shape[0]):
            frames.append(pd.DataFrame({
                "layer": layer, "head": head, "query_pos": q.numpy(), "key_pos": kpos.numpy(),
                "weight": pattern[head, q, kpos].numpy(),
            }))
    return pd.concat(frames, ignore_index=True)
