"""What the Model page shows: top next-token predictions and attention patterns, as tidy tables."""
from __future__ import annotations

import pandas as pd
import torch

from ...errors import WorkbenchError
from ...estimate import Estimate
from ...models import ModelHandle
from ...result import Result
from ...session import ModelSession, hook_name, session_for
from ...tokens import check_token_ids, token_strings, tokenize
from .spec import ModelViewSpec


def compute(session: ModelSession, spec: ModelViewSpec, inputs, progress) -> Result:
    ids = list(spec.token_ids)
    progress(0.2, "next-token predictions")
    preds = next_token_predictions(session, ids, k=spec.top_k)
    progress(0.5, "attention patterns")
    att = attention_patterns(session, ids)
    return Result(table=preds, meta={"n_tokens": len(ids)}, extra={"tokens": tokenize(session, ids), "attention": att})


@torch.no_grad()
def next_token_predictions(model: ModelSession | ModelHandle, ids: list[int], k: int = 10) -> pd.DataFrame:
    """The k most likely next tokens after the last position: rank, token_id, token, logit, prob, logprob."""
    check_token_ids(model, ids)
    k = max(1, min(int(k), model.summary.d_vocab))
    with session_for(model) as session:
        logits = session.forward(session.tensor(ids), return_type="logits")[0, -1].float()  # [d_vocab]
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(k)
    top_ids = top.indices.tolist()
    return pd.DataFrame({
        "rank": range(1, k + 1),
        "token_id": top_ids,
        "token": token_strings(model, top_ids),
        "logit": logits[top.indices].tolist(),
        "prob": top.values.exp().tolist(),
        "logprob": top.values.tolist(),
    })


@torch.no_grad()
def attention_patterns(model: ModelSession | ModelHandle, ids: list[int],
                       layers: list[int] | None = None) -> pd.DataFrame:
    """Attention weights in long format: layer, head, query_pos, key_pos, weight (causal: key_pos <= query_pos)."""
    check_token_ids(model, ids)
    n_layers = model.summary.n_layers
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if any(not 0 <= layer < n_layers for layer in layers):
        raise WorkbenchError(f"Layers must be between 0 and {n_layers - 1}.")
    names = {hook_name("pattern", layer) for layer in layers}
    with session_for(model) as session:
        _, cache = session.run_with_cache(session.tensor(ids), names)
    frames = []
    n = len(ids)
    q, kpos = torch.tril_indices(n, n)
    for layer in layers:
        pattern = cache[hook_name("pattern", layer)][0].float().cpu()  # [head, query_pos, key_pos]
        for head in range(pattern.shape[0]):
            frames.append(pd.DataFrame({
                "layer": layer, "head": head, "query_pos": q.numpy(), "key_pos": kpos.numpy(),
                "weight": pattern[head, q, kpos].numpy(),
            }))
    return pd.concat(frames, ignore_index=True)


def estimate(plan) -> Estimate:
    """Two forwards of the prompt (logits at every position), every layer's attention pattern cached, and the
    attention table: one row per layer, head and (query, key) pair."""
    s, P = plan.shape, plan.n_tokens()
    rows = s.n_layers * s.n_heads * P * (P + 1) // 2
    return Estimate(parts={"forward": s.forward_bytes(1, P), "patterns": 4 * s.n_layers * s.n_heads * P * P,
                           "attention table": 120 * rows},
                    flops=2 * s.forward_flops(1, P) + s.vocab_flops(1), blocks=s.calls(2),
                    extra_seconds=3e-4 * s.n_layers * s.n_heads,  # a table per head
                    lower="the prompt's length")
