"""Entropy of attention patterns.

Attention entropy of query i in a head: H_i = -sum_j A_ij log A_ij (nats). Under a causal mask query i sees i + 1
keys, so its largest possible entropy is log(i + 1); the normalised entropy H_i / log(i + 1) lies in [0, 1] and is
comparable across positions (query 0 sees one key and has none: NaN). A head whose mean normalised entropy is near 0
attends to one key wherever it looks ("entropy collapse").
"""
from __future__ import annotations

import torch


def attention_entropy(pattern: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pattern [..., Q, K] (rows sum to 1) -> (entropy [..., Q] in nats, normalised entropy [..., Q]).

    Normalised by log(number of keys the query sees): i + 1 for query i under a causal mask (queries aligned
    with the last Q keys), K otherwise."""
    p = pattern.float()
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    Q, K = p.shape[-2], p.shape[-1]
    if causal:
        seen = torch.arange(K - Q + 1, K + 1, device=p.device, dtype=torch.float32)  # keys visible to each query
    else:
        seen = torch.full((Q,), float(K), device=p.device)
    norm = ent / torch.log(seen)
    norm = torch.where(seen > 1, norm, torch.full_like(norm, float("nan")))
    return ent, norm
